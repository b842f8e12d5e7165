//! Generations of policies in the kernel maps: which half of the policy slots and port-table ids
//! a generation uses, which half is live (judged from what the maps hold), and whether a new
//! generation fits beside the running one. Pure: the loader reads the maps and acts on the answers.

use std::collections::HashSet;

use egress_common::{MAX_CGROUPS, MAX_CIDRS_V4, MAX_CIDRS_V6, MAX_POLICY_SLOTS, MAX_PORT_TABLES};
use thiserror::Error;

/// Policy slots one generation may use: a reload fills the other half while this one serves.
pub const SLOTS_PER_GENERATION: u32 = MAX_POLICY_SLOTS / 2;
/// Port-table ids one generation may use, for the same reason.
pub const PORT_TABLES_PER_GENERATION: u32 = MAX_PORT_TABLES / 2;

/// A generation of policies; its parity says which half of the slots and table ids it uses. A
/// reload fills the other half, switches the cgroups over, then clears the old half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation(pub u32);

impl Generation {
    pub fn half(self) -> u32 {
        self.0 % 2
    }
    pub fn first_slot(self) -> u32 {
        self.half() * SLOTS_PER_GENERATION
    }
    pub fn first_table_id(self) -> u32 {
        1 + self.half() * PORT_TABLES_PER_GENERATION
    }
    pub fn slots(self, count: usize) -> Vec<u32> {
        (0..count as u32).map(|i| self.first_slot() + i).collect()
    }
    pub fn max_policies() -> usize {
        SLOTS_PER_GENERATION as usize
    }
    pub fn owns_slot(self, slot: u32) -> bool {
        half_of_slot(slot) == self.half()
    }
    pub fn owns_table(self, id: u32) -> bool {
        id != 0 && (id - 1) / PORT_TABLES_PER_GENERATION == self.half()
    }
    pub fn next(self) -> Self {
        Self(self.0.wrapping_add(1))
    }
    /// The first generation from `self` on (itself or the next) that uses `half`.
    pub fn at_or_after_with_half(self, half: u32) -> Self {
        if self.half() == half {
            self
        } else {
            self.next()
        }
    }
}

pub fn half_of_slot(slot: u32) -> u32 {
    slot / SLOTS_PER_GENERATION
}

/// What an earlier daemon left, as judged from the maps at adoption.
#[derive(Debug, PartialEq, Eq)]
pub struct Adoption {
    /// The generation in force; `None` when no cgroup is bound to any slot (nothing to keep).
    pub live: Option<Generation>,
    /// Cgroups still bound to the other half: the earlier daemon died after switching the
    /// others over and before it removed these (they are not part of the new generation).
    pub stale: Vec<u64>,
}

/// Decides what is live from the bindings (`cgroup id -> slot`) and the generation marker the
/// loader writes just before it switches cgroups (`Settings::generation`).
///
/// The bindings are the truth: only a bound slot can judge a flow. Cgroups are switched to a new
/// generation in one system call, so bindings to both halves mean the switch was done and the
/// daemon died while unbinding the cgroups the new file no longer covers; the marker names the
/// new half, the rest are those leftovers.
pub fn adopt(bindings: impl IntoIterator<Item = (u64, u32)>, marker: u32) -> Adoption {
    let bindings: Vec<(u64, u32)> = bindings.into_iter().collect();
    let halves: HashSet<u32> = bindings.iter().map(|(_, slot)| half_of_slot(*slot)).collect();
    let marker = Generation(marker);
    match halves.len() {
        0 => Adoption { live: None, stale: Vec::new() },
        1 => {
            let half = *halves.iter().next().unwrap_or(&0);
            Adoption { live: Some(marker.at_or_after_with_half(half)), stale: Vec::new() }
        }
        _ => {
            let mut stale: Vec<u64> =
                bindings.iter().filter(|(_, slot)| !marker.owns_slot(*slot)).map(|(id, _)| *id).collect();
            stale.sort_unstable();
            Adoption { live: Some(marker), stale }
        }
    }
}

/// A limit a new generation would exceed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what}: {needed} needed, {available} available{scope}")]
pub struct CapacityError {
    pub what: &'static str,
    pub needed: usize,
    pub available: usize,
    pub scope: &'static str,
}

/// What a new generation needs, and what stays in the maps while it is switched in.
#[derive(Debug, Default, Clone, Copy)]
pub struct Demand {
    pub policies: usize,
    pub port_tables: usize,
    pub rules_v4: usize,
    pub rules_v6: usize,
    /// Cgroups bound while the switch runs: the running bindings plus the new generation's.
    pub bindings: usize,
    pub running_rules_v4: usize,
    pub running_rules_v6: usize,
}

/// Checks every capacity before anything is written: a generation that does not fit is refused
/// whole, with the limit it hit, and the running one is left untouched.
pub fn check_capacity(demand: &Demand) -> Result<(), CapacityError> {
    let per_generation = " per generation";
    let during_switch = " (the running policies stay in the maps during the switch)";
    let limits = [
        ("policy slots", demand.policies, SLOTS_PER_GENERATION as usize, per_generation),
        ("port tables", demand.port_tables, PORT_TABLES_PER_GENERATION as usize, per_generation),
        (
            "IPv4 rule entries",
            demand.rules_v4,
            (MAX_CIDRS_V4 as usize).saturating_sub(demand.running_rules_v4),
            during_switch,
        ),
        (
            "IPv6 rule entries",
            demand.rules_v6,
            (MAX_CIDRS_V6 as usize).saturating_sub(demand.running_rules_v6),
            during_switch,
        ),
        ("cgroup bindings", demand.bindings, MAX_CGROUPS as usize, " (old and new bindings during the switch)"),
    ];
    for (what, needed, available, scope) in limits {
        if needed > available {
            return Err(CapacityError { what, needed, available, scope });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIGH: u32 = SLOTS_PER_GENERATION;

    #[test]
    fn halves_do_not_overlap() {
        let (even, odd) = (Generation(4), Generation(5));
        assert_eq!(even.slots(2), [0, 1]);
        assert_eq!(odd.slots(2), [HIGH, HIGH + 1]);
        assert!(even.owns_table(even.first_table_id() + PORT_TABLES_PER_GENERATION - 1));
        assert!(!even.owns_table(odd.first_table_id()));
        assert!(!even.owns_table(0) && !odd.owns_table(0));
        assert_eq!(odd.first_table_id() + PORT_TABLES_PER_GENERATION - 1, MAX_PORT_TABLES);
    }

    #[test]
    fn nothing_bound_means_nothing_live() {
        assert_eq!(adopt([], 7), Adoption { live: None, stale: vec![] });
    }

    #[test]
    fn the_bound_half_is_live_whatever_the_marker_says() {
        // The marker is written before the switch: a daemon that died in between left it ahead.
        assert_eq!(adopt([(1, 0), (2, 3)], 7).live, Some(Generation(8)));
        assert_eq!(adopt([(1, HIGH)], 7).live, Some(Generation(7)));
        assert_eq!(adopt([(1, HIGH)], 6).live, Some(Generation(7)));
    }

    #[test]
    fn bindings_to_both_halves_leave_the_marked_half_live_and_the_rest_stale() {
        let adoption = adopt([(1, HIGH + 2), (2, 0), (3, HIGH), (4, 5)], 9);
        assert_eq!(adoption.live, Some(Generation(9)));
        assert_eq!(adoption.stale, [2, 4]);
    }

    #[test]
    fn capacity_names_the_limit_it_hit() {
        let demand = Demand { port_tables: 40_000, ..Demand::default() };
        let error = check_capacity(&demand).expect_err("too many tables");
        assert_eq!(error.to_string(), "port tables: 40000 needed, 32768 available per generation");

        let demand = Demand { rules_v4: 600_000, running_rules_v4: 500_000, ..Demand::default() };
        let error = check_capacity(&demand).expect_err("tries full");
        assert_eq!(error.what, "IPv4 rule entries");
        assert_eq!(error.available, MAX_CIDRS_V4 as usize - 500_000);

        let demand = Demand { policies: 4097, ..Demand::default() };
        assert_eq!(check_capacity(&demand).expect_err("slots").what, "policy slots");
        let demand = Demand { bindings: MAX_CGROUPS as usize + 1, ..Demand::default() };
        assert_eq!(check_capacity(&demand).expect_err("bindings").what, "cgroup bindings");
    }

    #[test]
    fn a_generation_at_every_limit_fits() {
        let demand = Demand {
            policies: SLOTS_PER_GENERATION as usize,
            port_tables: PORT_TABLES_PER_GENERATION as usize,
            rules_v4: MAX_CIDRS_V4 as usize / 2,
            running_rules_v4: MAX_CIDRS_V4 as usize / 2,
            rules_v6: 10,
            running_rules_v6: 0,
            bindings: MAX_CGROUPS as usize,
        };
        assert_eq!(check_capacity(&demand), Ok(()));
    }
}
