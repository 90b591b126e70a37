//! Planning on plain data: the four cells of the mode matrix, chains,
//! reclamation splits before and after the slave's last point, retention.

use super::fixtures::*;
use super::*;
use crate::catalog::record;
use crate::catalog::store::Host;
use crate::catalog::time;

fn gens(steps: &[Step]) -> Vec<&GenPlan> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Generation(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn disk<'a>(g: &'a GenPlan, d: &str) -> &'a DiskPlan {
    g.disks.iter().find(|x| x.disk == d).unwrap()
}

#[test]
fn qcow_interval_takes_the_newest_snapshot_and_builds_on_what_the_slave_has() {
    let m = qcow_master(3);
    let steps = plan_host(SyncMode::Interval, H, Some(&m), None);
    let g = gens(&steps);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].time, t(3));
    // The full image is copied; the chained one's parent is not on the slave.
    assert!(matches!(disk(g[0], "a").how, ImageSource::Copy { .. }));
    assert_eq!(disk(g[0], "b").how, ImageSource::Build { base: None });
    assert!(!disk(g[0], "b").journal);

    let slave = host(vec![snap(
        t(1),
        &[
            ("a", vec![qcow("a", t(1), None, false)]),
            ("b", vec![qcow("b", t(1), None, true)]),
        ],
        Some(t(1)),
    )]);
    let steps = plan_host(SyncMode::Interval, H, Some(&m), Some(&slave));
    let g = gens(&steps);
    assert_eq!(g.len(), 1, "only the newest, not t(2)");
    assert_eq!(
        disk(g[0], "b").how,
        ImageSource::Build {
            base: Some(BaseRef {
                time: t(1),
                file: record::qcow_file(H, "b", t(1))
            })
        }
    );
    let up_to_date = host(vec![snap(
        t(3),
        &[("a", vec![qcow("a", t(3), None, false)])],
        Some(t(3)),
    )]);
    assert!(plan_host(SyncMode::Interval, H, Some(&m), Some(&up_to_date)).is_empty());
}

#[test]
fn qcow_continuous_takes_the_newest_first_then_every_following_snapshot_in_order() {
    let m = qcow_master(4);
    let first = plan_host(SyncMode::Continuous, H, Some(&m), None);
    assert_eq!(
        gens(&first).iter().map(|g| g.time).collect::<Vec<_>>(),
        vec![t(4)]
    );

    let slave = host(vec![snap(
        t(1),
        &[
            ("a", vec![qcow("a", t(1), None, false)]),
            ("b", vec![qcow("b", t(1), None, true)]),
        ],
        Some(t(1)),
    )]);
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let g = gens(&steps);
    assert_eq!(
        g.iter().map(|g| g.time).collect::<Vec<_>>(),
        vec![t(2), t(3), t(4)]
    );
    // Each chained image's parent is on the slave by then: copied as is.
    for x in &g {
        assert!(
            matches!(disk(x, "b").how, ImageSource::Copy { .. }),
            "{x:?}"
        );
        assert_eq!(disk(x, "b").parent, Some(x.time - S));
    }
}

fn cdp_master(end: u64, points: u64) -> Host {
    host(vec![snap(
        t(1),
        &[(
            "a",
            vec![qcow("a", t(1), None, false), cdp("a", t(1), end, points)],
        )],
        None,
    )])
}

#[test]
fn cdp_interval_materialises_the_newest_point_as_an_image() {
    let m = cdp_master(t(9), 8);
    let steps = plan_host(SyncMode::Interval, H, Some(&m), None);
    let g = gens(&steps);
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].time, disk(g[0], "a").point), (t(9), t(9)));
    assert_eq!(disk(g[0], "a").how, ImageSource::Build { base: None });
    assert!(!disk(g[0], "a").journal);
    assert!(!steps.iter().any(|s| matches!(s, Step::Append(_))));

    let slave = host(vec![snap(
        t(9),
        &[("a", vec![qcow("a", t(9), None, false)])],
        Some(t(1)),
    )]);
    assert!(plan_host(SyncMode::Interval, H, Some(&m), Some(&slave)).is_empty());
    let m2 = cdp_master(t(12), 11);
    let steps = plan_host(SyncMode::Interval, H, Some(&m2), Some(&slave));
    let g = gens(&steps);
    assert_eq!(g[0].time, t(12));
    assert_eq!(
        disk(g[0], "a").how,
        ImageSource::Build {
            base: Some(BaseRef {
                time: t(9),
                file: record::qcow_file(H, "a", t(9))
            })
        }
    );
}

fn slave_with_journal(base: u64, end: u64, source: u64) -> Host {
    host(vec![snap(
        base,
        &[(
            "a",
            vec![qcow("a", base, None, false), cdp("a", base, end, 3)],
        )],
        Some(source),
    )])
}

#[test]
fn cdp_continuous_starts_with_the_newest_point_then_appends_the_following_ones() {
    let m = cdp_master(t(9), 8);
    let first = plan_host(SyncMode::Continuous, H, Some(&m), None);
    let g = gens(&first);
    assert_eq!(disk(g[0], "a").point, t(9));
    assert!(disk(g[0], "a").journal, "continuous cdp starts a journal");
    assert!(
        !first.iter().any(|s| matches!(s, Step::Append(_))),
        "nothing after the newest yet"
    );

    let slave = slave_with_journal(t(9), t(9), t(1));
    let m2 = cdp_master(t(12), 11);
    let steps = plan_host(SyncMode::Continuous, H, Some(&m2), Some(&slave));
    assert_eq!(steps.len(), 1);
    let Step::Append(a) = &steps[0] else {
        panic!("{steps:?}")
    };
    assert_eq!(
        a.sources,
        vec![AppendSource::Journal {
            file: record::cdp_file(H, "a", t(1)),
            length: 128 + 1100,
            after: t(9)
        }]
    );
}

#[test]
fn a_new_master_snapshot_in_continuous_cdp_finishes_the_old_journal_then_mirrors_it() {
    let mut m = cdp_master(t(9), 8);
    let s2 = snap(
        t(10),
        &[(
            "a",
            vec![
                qcow("a", t(10), Some(t(1)), true),
                cdp("a", t(10), t(14), 4),
            ],
        )],
        None,
    );
    m.snapshots.insert(t(10), s2);
    let slave = slave_with_journal(t(5), t(7), t(1));
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let kinds: Vec<String> = steps
        .iter()
        .map(|s| match s {
            Step::Append(a) => format!("append {}", time::name(a.journal.start)),
            Step::Generation(g) => format!("gen {}", time::name(g.time)),
            Step::Delete { snapshot } => format!("delete {snapshot}"),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            format!("append {}", time::name(t(5))),
            format!("gen {}", time::name(t(10))),
            format!("append {}", time::name(t(10))),
        ]
    );
    let g = gens(&steps)[0];
    // The slave lacks the master's parent t(1): built on its own t(5), which the master can restore.
    assert_eq!(
        disk(g, "a").how,
        ImageSource::Build {
            base: Some(BaseRef {
                time: t(5),
                file: record::qcow_file(H, "a", t(5))
            })
        }
    );
}

fn reclaimed_master(m: u64, end: u64) -> Host {
    host(vec![snap(
        t(1),
        &[(
            "a",
            vec![
                qcow("a", t(1), None, false),
                qcow("a", m, Some(t(1)), true),
                cdp("a", m, end, 3),
            ],
        )],
        None,
    )])
}

#[test]
fn reclamation_split_never_resends_or_skips_a_point() {
    // The slave is past the split: only the journal's later points.
    let m = reclaimed_master(t(5), t(9));
    let slave = slave_with_journal(t(1), t(7), t(1));
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let Step::Append(a) = &steps[0] else {
        panic!("{steps:?}")
    };
    assert_eq!(
        a.sources,
        vec![AppendSource::Journal {
            file: record::cdp_file(H, "a", t(5)),
            length: 128 + 300,
            after: t(7)
        }]
    );
    // Before the split: the split point (now an image) as one point, then the journal.
    let slave = slave_with_journal(t(1), t(3), t(1));
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let Step::Append(a) = &steps[0] else {
        panic!("{steps:?}")
    };
    assert_eq!(
        a.sources,
        vec![
            AppendSource::Image {
                time: t(5),
                chain: vec![record::qcow_file(H, "a", t(5))],
                since: t(1),
                full: false
            },
            AppendSource::Journal {
                file: record::cdp_file(H, "a", t(5)),
                length: 128 + 300,
                after: t(5)
            }
        ]
    );
    // A replica journal based after the image's base: every block is sent.
    let slave = slave_with_journal(t(2), t(3), t(1));
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let Step::Append(a) = &steps[0] else {
        panic!("{steps:?}")
    };
    assert!(matches!(
        a.sources[0],
        AppendSource::Image { full: true, .. }
    ));
    // Up to date after the split: nothing.
    let slave = slave_with_journal(t(1), t(9), t(1));
    assert!(plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave)).is_empty());
}

#[test]
fn a_snapshot_deleted_by_retention_is_deleted_on_the_slave_after_the_new_ones() {
    let mut m = qcow_master(3);
    m.snapshots.remove(&t(1));
    let slave = host(vec![
        snap(
            t(1),
            &[("a", vec![qcow("a", t(1), None, false)])],
            Some(t(1)),
        ),
        snap(
            t(2),
            &[("a", vec![qcow("a", t(2), None, false)])],
            Some(t(2)),
        ),
    ]);
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    assert!(matches!(steps.first(), Some(Step::Generation(g)) if g.time == t(3)));
    assert_eq!(
        steps.last(),
        Some(&Step::Delete {
            snapshot: time::name(t(1))
        })
    );
    // Unreadable this time is not gone.
    m.unreadable.push(time::name(t(1)));
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    assert!(!steps.iter().any(|s| matches!(s, Step::Delete { .. })));
    // A host gone from the master: all its replicas go.
    let steps = plan_host(SyncMode::Continuous, H, None, Some(&slave));
    assert_eq!(steps.len(), 2);
}

#[test]
fn a_failback_keeps_the_old_masters_generations_its_new_master_holds_under_other_names() {
    // The new master (once the replica) made t(5) from the old master's t(1):
    // the old master's own t(1), named by its time and with no source, stays.
    let m = host(vec![snap(
        t(5),
        &[("a", vec![qcow("a", t(5), None, false)])],
        Some(t(1)),
    )]);
    let old = host(vec![
        snap(t(1), &[("a", vec![qcow("a", t(1), None, false)])], None),
        snap(t(2), &[("a", vec![qcow("a", t(2), None, false)])], None),
    ]);
    let steps = plan_host(SyncMode::Interval, H, Some(&m), Some(&old));
    let deleted: Vec<_> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Delete { snapshot } => Some(snapshot.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec![time::name(t(2))]);
}

#[test]
fn a_newest_point_the_slave_holds_in_its_own_journal_is_not_sent_again() {
    let m = host(vec![snap(
        t(5),
        &[("a", vec![qcow("a", t(5), None, false)])],
        Some(t(1)),
    )]);
    let old = host(vec![snap(
        t(1),
        &[(
            "a",
            vec![qcow("a", t(1), None, false), cdp("a", t(1), t(5), 4)],
        )],
        None,
    )]);
    let steps = plan_host(SyncMode::Interval, H, Some(&m), Some(&old));
    assert!(steps.is_empty(), "{steps:#?}");
    // One point further on the master: sent.
    let m2 = host(vec![snap(
        t(6),
        &[("a", vec![qcow("a", t(6), None, false)])],
        Some(t(1)),
    )]);
    let steps = plan_host(SyncMode::Interval, H, Some(&m2), Some(&old));
    assert_eq!(gens(&steps).len(), 1);
}

#[test]
fn switching_to_continuous_after_interval_starts_a_journal_at_the_newest_point() {
    let m = cdp_master(t(12), 11);
    // Made in interval mode: an image of t(9), no journal.
    let slave = host(vec![snap(
        t(9),
        &[("a", vec![qcow("a", t(9), None, false)])],
        Some(t(1)),
    )]);
    let steps = plan_host(SyncMode::Continuous, H, Some(&m), Some(&slave));
    let g = gens(&steps);
    assert_eq!(g.len(), 1, "{steps:?}");
    assert_eq!(disk(g[0], "a").point, t(12));
    assert!(disk(g[0], "a").journal);
    assert_eq!(
        disk(g[0], "a").how,
        ImageSource::Build {
            base: Some(BaseRef {
                time: t(9),
                file: record::qcow_file(H, "a", t(9))
            })
        }
    );
}
