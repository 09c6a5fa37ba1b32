//! In-process overhead benchmark for `scripts/bench-overhead.sh` (not a test): what the
//! Prometheus metrics and a managed API key add to one chat request's CPU, each measured
//! against the same request without it in one thread ([`dbgpt_cluster::overhead`]).
//! Prints a Markdown table: the medians over the rounds and every round's difference.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Rounds (each runs both variants of every comparison, alternating which goes first).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Requests per variant per round.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Only run comparison N (0-based, in the table's order) `--requests` times, with the
    /// piece (`--with`) or without, and print nothing: for callgrind (scripts/bench-overhead.sh
    /// INSTRUCTIONS=1).
    #[arg(long)]
    only: Option<usize>,
    #[arg(long)]
    with: bool,
}

fn main() {
    let args = Args::parse();
    if let Some(i) = args.only {
        match dbgpt_cluster::overhead::run_one(i, args.with, args.requests.max(1)) {
            Some((piece, kind)) => eprintln!("{piece} {} with={}", kind.as_str(), args.with),
            None => {
                eprintln!("--only {i}: no such comparison");
                std::process::exit(2);
            }
        }
        return;
    }
    let rows = dbgpt_cluster::overhead::measure(args.rounds.max(1), args.requests.max(1));
    println!(
        "| piece | request | without (µs/req) | with (µs/req) | added, median (µs/req) | added, per round (min … max) |"
    );
    println!("|---|---|---:|---:|---:|---|");
    for r in rows {
        let (lo, hi) = r
            .added_ns
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!(
            "| {} | {} | {:.2} | {:.2} | **{:+.2}** | {:+.2} … {:+.2} |",
            r.piece,
            r.kind.as_str(),
            r.without_ns / 1e3,
            r.with_ns / 1e3,
            r.added_median_ns() / 1e3,
            lo / 1e3,
            hi / 1e3,
        );
    }
}
