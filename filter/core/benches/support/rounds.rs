//! Interleaved rounds, for two functions whose difference is smaller than the machine's drift: rounds of
//! one block of calls of each, the order alternating per round, written as JSON under criterion's
//! directory for `make bench` to take the per-round ratio. Included by `admit_record` (here) and by
//! the harness's `breakers` bench.

use std::path::Path;
use std::time::Instant;

/// Rounds of one block of calls of `a` and one of `b`, the order alternating per round: ns per call
/// of each, per round.
pub fn interleaved(mut a: impl FnMut(), mut b: impl FnMut()) -> Vec<(f64, f64)> {
    const ROUNDS: usize = 100;
    const CALLS: u32 = 20_000;
    let block = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        started.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS)
    };
    (0..ROUNDS)
        .map(|round| {
            if round % 2 == 0 {
                let x = block(&mut a);
                (x, block(&mut b))
            } else {
                let y = block(&mut b);
                (block(&mut a), y)
            }
        })
        .collect()
}

/// `rounds` as JSON under criterion's directory, `<target>/criterion/<name>`, for `make bench`.
pub fn write_rounds(name: &str, rounds: &[(f64, f64)]) {
    let Some(target) = Path::new(env!("CARGO_TARGET_TMPDIR")).parent() else {
        return;
    };
    let path = target.join("criterion").join(name);
    let pairs: Vec<String> = rounds
        .iter()
        .map(|(a, b)| format!("[{a:.3},{b:.3}]"))
        .collect();
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, format!("[{}]\n", pairs.join(","))));
    match written {
        Ok(()) => println!("interleaved rounds written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
