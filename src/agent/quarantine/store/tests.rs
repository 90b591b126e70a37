//! The store quarantine's plan on plain data: common points per disk,
//! divergent generations, journals cut back, history the peer never held.

use super::*;
use crate::catalog::plan::fixtures::{cdp, host, qcow, snap, t, H};

/// Journal spans at `times`, 100 bytes each after the header.
fn spans_at(file: &str, times: &[u64]) -> Spans {
    let v = times
        .iter()
        .enumerate()
        .map(|(i, &time)| PointSpan {
            time,
            start: 128 + i as u64 * 100,
            end: 228 + i as u64 * 100,
        })
        .collect();
    [(file.to_string(), v)].into_iter().collect()
}

fn peer(disk: &str, times: &[u64]) -> PeerPoints {
    [(
        (H.to_string(), disk.to_string()),
        times.iter().copied().collect(),
    )]
    .into_iter()
    .collect()
}

/// Disk a: t0 an old image; t1 an image and a journal of t2..t5; t6 an image.
fn store() -> (Catalog, Spans) {
    let h = host(vec![
        snap(t(0), &[("a", vec![qcow("a", t(0), None, false)])], None),
        snap(
            t(1),
            &[(
                "a",
                vec![qcow("a", t(1), None, false), cdp("a", t(1), t(5), 4)],
            )],
            None,
        ),
        snap(t(6), &[("a", vec![qcow("a", t(6), None, false)])], None),
    ]);
    let file = record::cdp_file(H, "a", t(1));
    let cat = Catalog {
        hosts: [(H.to_string(), h)].into_iter().collect(),
    };
    (cat, spans_at(&file, &[t(2), t(3), t(4), t(5)]))
}

fn by_snapshot(actions: &[StoreAction]) -> BTreeMap<u64, &StoreAction> {
    actions
        .iter()
        .map(|a| (crate::catalog::time::parse(&a.snapshot).unwrap(), a))
        .collect()
}

#[test]
fn points_after_the_common_one_are_divergent_and_the_journal_is_cut_there() {
    let (cat, spans) = store();
    let actions = plan(&cat, &spans, &peer("a", &[t(0), t(1), t(2), t(3)]), false);
    let a = by_snapshot(&actions);
    assert_eq!(a.len(), 2, "{actions:#?}");
    assert!(a[&t(6)].remove && a[&t(6)].reason == "divergent");
    let cut = &a[&t(1)];
    assert!(!cut.remove && cut.reason == "divergent points");
    assert_eq!(
        cut.cuts,
        vec![StoreCut {
            record: format!(
                "{}/{}/s1",
                record::snapshots_dir(H),
                crate::catalog::time::name(t(1))
            ),
            length: 328,
            points: 2,
            end: t(3),
            from: (128 + 4 * 100, 4, t(5)),
        }]
    );
}

#[test]
fn a_common_point_on_the_image_cuts_every_journal_point() {
    let (cat, spans) = store();
    let actions = plan(&cat, &spans, &peer("a", &[t(1)]), false);
    let a = by_snapshot(&actions);
    assert_eq!(a[&t(1)].cuts[0].length, 128);
    assert_eq!(a[&t(1)].cuts[0].points, 0);
    assert_eq!(a[&t(1)].cuts[0].end, t(1));
    assert!(a[&t(0)].reason == "absent" && !a[&t(0)].remove);
}

#[test]
fn the_newest_common_point_counts_even_when_older_ones_are_missing() {
    let (cat, spans) = store();
    // The peer's retention dropped t0..t3; it holds t4 and its own later points.
    let actions = plan(&cat, &spans, &peer("a", &[t(4), t(100)]), false);
    let a = by_snapshot(&actions);
    assert_eq!(a[&t(1)].cuts[0].end, t(4));
    assert_eq!(a[&t(1)].cuts[0].points, 3);
    assert_eq!(a[&t(0)].reason, "absent");
    assert!(a[&t(6)].remove);
}

#[test]
fn equal_stores_need_nothing_and_a_disk_the_peer_never_had_is_divergent() {
    let (cat, spans) = store();
    let all = [t(0), t(1), t(2), t(3), t(4), t(5), t(6)];
    assert!(plan(&cat, &spans, &peer("a", &all), false).is_empty());
    let actions = plan(&cat, &spans, &peer("b", &all), false);
    assert!(
        actions.len() == 3 && actions.iter().all(|a| a.remove),
        "{actions:#?}"
    );
    let forced = plan(&cat, &spans, &peer("a", &all), true);
    assert!(forced.len() == 3 && forced.iter().all(|a| a.remove));
}

#[test]
fn a_disk_the_peer_never_held_makes_only_later_host_snapshots_divergent() {
    // Disk b was detached before B's first sync: B holds points of a only.
    let h = host(vec![
        snap(
            t(1),
            &[
                ("a", vec![qcow("a", t(1), None, false)]),
                ("b", vec![qcow("b", t(1), None, false)]),
            ],
            None,
        ),
        snap(
            t(2),
            &[("a", vec![qcow("a", t(2), Some(t(1)), true)])],
            None,
        ),
        snap(
            t(3),
            &[
                ("a", vec![qcow("a", t(3), None, false)]),
                ("b", vec![qcow("b", t(3), None, false)]),
            ],
            None,
        ),
    ]);
    let cat = Catalog {
        hosts: [(H.to_string(), h)].into_iter().collect(),
    };
    let actions = plan(&cat, &Spans::new(), &peer("a", &[t(2)]), false);
    let a = by_snapshot(&actions);
    assert_eq!(a[&t(1)].reason, "absent", "{actions:#?}");
    assert!(!a[&t(1)].remove);
    assert!(!a.contains_key(&t(2)));
    assert!(a[&t(3)].remove && a[&t(3)].reason == "divergent");
}
