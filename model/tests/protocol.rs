//! Checks the model of the crawl protocol: the protocol as georep
//! implements it keeps both properties in every reachable state, and each
//! of the three defects the model found (and georep fixed) is found again
//! when its fix is taken out, so the model is not vacuous.
//!
//! A short bounded run by default (seconds); `GEOREP_MODEL_LONG=1` runs
//! larger bounds (more writes, crashes and gaps: minutes).

use georep_model::tree::Order;
use georep_model::{Config, Policy, ProtocolModel};
use stateright::{Checker, Model};

fn long() -> bool {
    std::env::var_os("GEOREP_MODEL_LONG").is_some_and(|v| v != "0")
}

fn bounded(policy: Policy) -> Config {
    let mut c = Config::fixed(policy);
    if long() {
        c.writes = 3;
        c.worker_crashes = 2;
        c.gaps = 2;
    }
    c
}

fn check(cfg: Config) -> impl Checker<ProtocolModel> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    ProtocolModel { cfg }
        .checker()
        .threads(threads)
        .spawn_bfs()
        .join()
}

fn holds(policy: Policy) {
    let cfg = bounded(policy);
    let c = check(cfg.clone());
    println!(
        "{policy:?}: {} states explored ({} unique), depth {}, bounds {cfg:?}",
        c.state_count(),
        c.unique_state_count(),
        c.max_depth()
    );
    c.assert_no_discovery("no lost change");
    c.assert_no_discovery("stime safety");
    c.assert_any_discovery("converges after a change");
}

#[test]
fn the_protocol_keeps_both_properties_with_the_watcher() {
    holds(Policy::Auto);
}

#[test]
fn the_protocol_keeps_both_properties_with_integrated_marks() {
    holds(Policy::Mark);
}

/// Takes one fix out; the checker must find the defect it fixed.
fn finds(policy: Policy, unfix: impl Fn(&mut Config), property: &'static str) {
    let mut cfg = Config::fixed(policy);
    unfix(&mut cfg);
    let c = check(cfg);
    let path = c.assert_any_discovery(property);
    println!(
        "{policy:?}, {property}: counterexample of {} steps after {} states:\n{:#?}",
        path.clone().into_actions().len(),
        c.unique_state_count(),
        path.into_actions()
    );
}

#[test]
fn per_path_stamp_order_loses_a_change() {
    finds(
        Policy::Auto,
        |c| c.order = Order::PerPathChains,
        "stime safety",
    );
    finds(
        Policy::Auto,
        |c| c.order = Order::PerPathChains,
        "no lost change",
    );
}

#[test]
fn an_unreserved_clock_reissues_a_stamp_after_an_interrupted_marker() {
    finds(Policy::Auto, |c| c.reserved_clock = false, "stime safety");
    finds(Policy::Mark, |c| c.reserved_clock = false, "no lost change");
}

#[test]
fn without_dirmarks_a_directory_renamed_into_place_is_never_compared() {
    finds(
        Policy::Mark,
        |c| {
            c.dir_marks = false;
            c.quick_check = false;
        },
        "no lost change",
    );
}

#[test]
fn a_full_crawl_without_a_final_barrier_can_lose_a_removal() {
    finds(Policy::Auto, |c| c.final_barrier = false, "no lost change");
}
