//! Compression (`compression = off | zstd[:LEVEL] | auto`): what reaches
//! the slave is byte for byte the master's, the ratio in `sync --json`
//! is what crossed over what would have, `auto` leaves random data alone,
//! and an agent of an older protocol refuses the worker with the fix.

mod common;

use common::{tree, World};

fn text(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"guest block: zeroed pages, logs and binaries\n"[i % 45])
        .collect()
}

fn random(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn ratio(s: &serde_json::Value) -> f64 {
    s["compression_ratio"].as_f64().unwrap()
}

#[test]
fn compressed_transfers_round_trip_and_report_their_ratio() {
    for (mode, compressible) in [
        ("zstd", true),
        ("zstd:9", true),
        ("auto", true),
        ("auto", false),
        ("off", true),
    ] {
        let w = World::new();
        let data = if compressible {
            text(12 << 20)
        } else {
            random(12 << 20, 5)
        };
        std::fs::write(w.master.join("image.raw"), &data).unwrap();
        for i in 0..20 {
            std::fs::write(w.master.join(format!("small{i}")), text(20_000 + i * 100)).unwrap();
        }
        w.create("z", &[]);
        w.run_ok(&["config", "z", "set", "compression", mode]);
        let s = w.sync("z");
        tree::assert_same(&w.master, &w.slave);
        match (mode, compressible) {
            ("off", _) => assert_eq!(ratio(&s), 1.0, "{s}"),
            (_, true) => assert!(ratio(&s) < 0.1, "{mode}: {s}"),
            (_, false) => assert!(ratio(&s) > 0.95, "auto leaves random data alone: {s}"),
        }
        // Changes compress too (block literals of a differing window).
        let mut changed = data.clone();
        for k in 0..50 {
            changed[k * 200_000] ^= 0x55;
        }
        std::fs::write(w.master.join("image.raw"), &changed).unwrap();
        let s2 = w.sync("z");
        tree::assert_same(&w.master, &w.slave);
        assert_eq!(s2["files_synced"], 1, "{s2}");
    }
}

#[test]
fn an_agent_refuses_a_worker_of_an_older_protocol() {
    let w = World::new();
    std::fs::create_dir_all(&w.slave).unwrap();
    let e = common::raw_agent::RawAgent::start_as(
        &w.slave,
        georep::protocol::Request::Hello {
            version: 5,
            client: "georep 0.0.5 worker".into(),
        },
    )
    .err()
    .expect("refused");
    assert_eq!(e.kind, georep::protocol::ErrorKind::Version);
    assert!(
        e.message.contains("install the same georep version"),
        "{e:?}"
    );
}
