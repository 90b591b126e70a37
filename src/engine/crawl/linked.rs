//! Shipping a multiply-linked master file: once per crawl through its
//! first name, the other names linked to it on the slave (the registry of
//! names is `engine::links`).

use crate::engine::context::Engine;
use crate::engine::master::MEntry;
use crate::fs::relpath::RelPath;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Ships a multiply-linked file: the first of its names in this crawl
/// ships the content and re-links the other remembered names; later names
/// become links to it.
pub(super) async fn ship_linked(
    e: &Arc<Engine>,
    path: &RelPath,
    m: &MEntry,
    basis: crate::engine::transfer::Basis,
) -> bool {
    let key = (m.entry.dev, m.entry.ino);
    let cell = e.links().cell(key);
    let first = cell
        .get_or_init(|| async {
            e.ship_plain(path, m, None, basis)
                .await
                .then(|| path.clone())
        })
        .await
        .clone();
    match first {
        None => false,
        Some(p) if &p == path => {
            for other in e.links().others(key, path) {
                let same_inode = {
                    let full = e.master.path(&other);
                    tokio::task::spawn_blocking(move || std::fs::symlink_metadata(full).ok())
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|md| {
                            std::os::unix::fs::MetadataExt::ino(&md) == key.1
                                && std::os::unix::fs::MetadataExt::dev(&md) == key.0
                        })
                };
                if !same_inode {
                    e.links().forget(key, &other);
                    continue;
                }
                match link(e, &other, path).await {
                    // The link changed its directory, whose metadata may already
                    // have been set by this crawl: set it again, from the master.
                    Ok(()) => {
                        if let Err(err) = restore_dir_meta(e, &other).await {
                            if err.is_fatal() {
                                e.record_slave_err(&other, err);
                                return false;
                            }
                        }
                    }
                    // Its directory may not exist on the slave yet: it is linked when visited.
                    Err(err) if !err.is_fatal() => {
                        tracing::debug!(path = %other, to = %path, error = %err, "not linked yet");
                    }
                    Err(err) => {
                        e.record_slave_err(&other, err);
                        return false;
                    }
                }
            }
            true
        }
        Some(p) => match link(e, path, &p).await {
            Ok(()) => true,
            Err(err) => {
                e.record_slave_err(path, err);
                false
            }
        },
    }
}

async fn restore_dir_meta(e: &Engine, path: &RelPath) -> Result<(), crate::protocol::ProtoError> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let full = e.master.path(&dir);
    let meta = tokio::task::spawn_blocking(move || {
        let md = std::fs::symlink_metadata(&full).ok()?;
        let x = crate::fs::meta::read_xattrs(&full).ok()?;
        Some(crate::fs::meta::Meta::from_metadata(&md, x))
    })
    .await
    .ok()
    .flatten();
    match meta {
        Some(meta) => e.slave.set_meta(dir, meta).await?.wait().await,
        None => Ok(()),
    }
}

async fn link(
    e: &Engine,
    path: &RelPath,
    target: &RelPath,
) -> Result<(), crate::protocol::ProtoError> {
    e.slave
        .link(path.clone(), target.clone())
        .await?
        .wait()
        .await?;
    e.stats.hardlinks.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
