//! This process's memory as the kernel counts it (Linux `/proc/self/status`; `None` elsewhere).
//!
//! `VmHWM` is the peak resident set, memory-mapped checkpoint and engine pages included;
//! `RssAnon` is the anonymous part only (heap, stacks), the memory the kernel cannot reclaim by
//! dropping file pages, which is what decides whether a process fits a machine.

/// Peak resident set size of this process so far, in MB (`VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    status_kb("VmHWM:").map(|kb| kb / 1024.0)
}

/// Resident anonymous memory of this process now, in MB (`RssAnon`).
pub fn rss_anon_mb() -> Option<f64> {
    status_kb("RssAnon:").map(|kb| kb / 1024.0)
}

fn status_kb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kb(&status, key)
}

fn parse_kb(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kilobytes_of_a_field() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nRssAnon:\t    512 kB\n";
        assert_eq!(parse_kb(status, "VmHWM:"), Some(2048.0));
        assert_eq!(parse_kb(status, "RssAnon:"), Some(512.0));
        assert_eq!(parse_kb(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_has_a_resident_set_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
            assert!(rss_anon_mb().is_some_and(|mb| mb > 0.0));
        }
    }
}
