//! `BPF_MAP_UPDATE_BATCH`, which aya 0.14 has no call for.

use std::os::fd::{AsRawFd, BorrowedFd};

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// One `BPF_MAP_UPDATE_BATCH` call (aya 0.14 has no batch operations). On error: how many of the
/// entries the kernel wrote before it stopped.
pub(super) fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    let count = u32::try_from(keys.len().min(values.len())).map_err(|e| (0, std::io::Error::other(e)))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` keys and values that live until the call returns; the
    // kernel writes back only `attr.count`.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
    };
    if result < 0 {
        let error = std::io::Error::last_os_error();
        return Err((attr.count.min(count) as usize, error));
    }
    Ok(())
}
