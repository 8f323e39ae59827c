//! The machine the bench runs on: its CPUs and where the processes go, the versions of what is
//! measured, and the CPU time and memory of a process.

use std::fs;

use super::Ctx;

/// The CPUs this process may use (`Cpus_allowed_list`), first for the proxy, the rest for load.
pub(super) fn placement() -> (Option<String>, Option<String>) {
    let allowed = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .map(|list| parse_cpu_list(&list))
        .unwrap_or_default();
    match allowed.split_first() {
        Some((first, rest)) if !rest.is_empty() && which("taskset") => {
            let rest: Vec<String> = rest.iter().map(u32::to_string).collect();
            (Some(first.to_string()), Some(rest.join(",")))
        }
        _ => (None, None),
    }
}

/// `0-3,6` → [0, 1, 2, 3, 6].
pub(super) fn parse_cpu_list(list: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<u32>(), hi.parse::<u32>()) {
            out.extend(lo..=hi.min(lo.saturating_add(1023)));
        }
    }
    out
}

pub(super) fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

pub(super) fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(super) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string()
        + String::from_utf8_lossy(&out.stderr).as_ref();
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

pub(super) struct Machine {
    pub(super) nproc: usize,
    pub(super) cpu: String,
    pub(super) mem: String,
    pub(super) kernel: String,
    pub(super) envoy: String,
    pub(super) h2load: String,
    pub(super) rustc: String,
    pub(super) date: String,
    pub(super) loadavg: String,
}

impl Machine {
    pub(super) async fn read(ctx: &Ctx) -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let mem = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map_or_else(
                || "?".into(),
                |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
            );
        let envoy = ctx.envoy.to_str().unwrap_or("envoy").to_string();
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            mem,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
            envoy: command_output(&envoy, &["--version"])
                .and_then(|v| v.split_once("version: ").map(|(_, v)| v.to_string()))
                .unwrap_or_else(|| "?".into()),
            h2load: command_output("h2load", &["--version"]).unwrap_or_else(|| "?".into()),
            rustc: command_output("rustc", &["--version"]).unwrap_or_else(|| "?".into()),
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "?".into()),
            loadavg: loadavg(),
        }
    }
}

/// utime + stime of the whole process `pid`, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of process `pid`, in KiB.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5"), vec![0, 1, 2, 5]);
    }
}
