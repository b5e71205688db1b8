//! The process's open-file limit. Distributions start processes with a
//! soft limit of 1024 descriptors (for `select`'s sake) and a hard limit far
//! above; an HTTP endpoint holding `[http] max_connections` connections
//! needs more than the soft one. A process may raise its soft limit up to
//! the hard one by itself, so the endpoint does, as far as it needs.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors beyond the HTTP connections: the bus connections, the
/// workers' pipes and sockets, plugin and log files.
pub const HEADROOM: u64 = 256;

/// The open-file limit before and after [`raise_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

impl FdLimit {
    /// Whether the soft limit now allows `wanted` descriptors.
    pub fn allows(&self, wanted: u64) -> bool {
        self.now.is_none_or(|n| n >= wanted)
    }
}

/// The soft limit to set so that `wanted` descriptors fit, given the
/// current `soft` and `hard` limits (`None`: unlimited); `None` when it
/// need not change. Never lowers it, never asks above the hard limit.
fn raised(soft: Option<u64>, hard: Option<u64>, wanted: u64) -> Option<u64> {
    let soft = soft?;
    if soft >= wanted {
        return None;
    }
    let target = hard.map_or(wanted, |h| wanted.min(h));
    (target > soft).then_some(target)
}

/// Raises the soft open-file limit to `wanted` descriptors, or as close as
/// the hard limit allows.
pub fn raise_to(wanted: u64) -> std::io::Result<FdLimit> {
    let limit = getrlimit(Resource::Nofile);
    let Some(target) = raised(limit.current, limit.maximum, wanted) else {
        return Ok(FdLimit {
            before: limit.current,
            now: limit.current,
        });
    };
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )?;
    Ok(FdLimit {
        before: limit.current,
        now: Some(target),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_as_far_as_needed_and_the_hard_limit_allows() {
        assert_eq!(raised(Some(1024), Some(524_288), 1280), Some(1280));
        assert_eq!(raised(Some(1024), Some(1100), 1280), Some(1100));
        assert_eq!(raised(Some(1024), None, 1280), Some(1280));
        assert_eq!(raised(Some(4096), Some(524_288), 1280), None);
        assert_eq!(raised(Some(1024), Some(1024), 1280), None);
        assert_eq!(raised(None, None, 1280), None);
    }
}
