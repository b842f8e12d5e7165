//! What can go wrong with a kernel object.

use std::path::PathBuf;

use aya::{
    maps::MapError,
    programs::{links::LinkError, ProgramError},
    EbpfError,
};
use egress_common::{MAX_CGROUPS, MAX_DEEP_GUARDS};
use thiserror::Error;

use crate::{cgroup::CgroupError, generation::CapacityError};

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("loading the kernel object: {0}")]
    Object(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: batched update: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("more than {MAX_CGROUPS} cgroups are bound to policies")]
    TooManyBindings,
    #[error("more than {MAX_DEEP_GUARDS} level-15 cgroups have bound descendants deeper than the kernel walk")]
    TooManyDeepGuards,
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("generation {generation}: slot or port table {id} lies outside its half")]
    OutsideHalf { generation: u32, id: u32 },
    #[error(
        "switching cgroups to the new policies failed after {switched} of {total} ({source}); \
         they were switched back and the previous policies stay in force"
    )]
    Switch {
        switched: usize,
        total: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    pub(super) fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { name, source }
    }

    pub(super) fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program { name, source }
    }

    pub(super) fn pin(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Pin { path: path.to_path_buf(), source }
    }
}
