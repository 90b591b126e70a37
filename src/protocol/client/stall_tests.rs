//! The keep-alive against a peer that stops reading (a stalled link) and
//! against a peer that reads slowly (a slow link): the first is declared
//! stalled even with the send budget full, the second never is. Virtual
//! time (`start_paused`), so minutes of link time take no real time.

use super::*;
use crate::protocol::{encode_frame, MAX_DATA};
use serde_bytes::ByteBuf;

/// The agent's side of the handshake: the banner and a HelloOk.
fn hello() -> Vec<u8> {
    let mut out = BANNER.to_vec();
    out.extend(
        encode_frame(&Response {
            id: 1,
            last: true,
            result: Ok(Reply::HelloOk {
                version: PROTOCOL_VERSION,
                agent: "test".into(),
                root: "/r".into(),
            }),
        })
        .unwrap(),
    );
    out
}

fn write_req(fid: u64) -> Request {
    Request::Write {
        fid,
        offset: 0,
        data: ByteBuf::from(vec![7u8; MAX_DATA]),
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_declared_stalled_even_with_the_send_budget_full() {
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (r, w) = tokio::io::split(ours);
    let (_tr, mut tw) = tokio::io::split(theirs);
    tw.write_all(&hello()).await.unwrap();
    let client = Client::connect(r, w, Duration::from_secs(3)).await.unwrap();
    // More data than the budget: the link takes 64 KiB, then nothing.
    let filler = {
        let c = client.clone();
        tokio::spawn(async move {
            for fid in 0.. {
                if c.post(write_req(fid)).await.is_err() {
                    return;
                }
            }
        })
    };
    let e = tokio::time::timeout(Duration::from_secs(3600), client.lost())
        .await
        .expect("the stall was never detected");
    assert!(matches!(e, ProtoError::Timeout(3)), "{e}");
    assert!(e.to_string().contains("stalled"), "{e}");
    drop(client);
    let _ = filler.await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_link_with_a_long_queue_ahead_of_the_ping_is_not_declared_stalled() {
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (r, w) = tokio::io::split(ours);
    let (mut tr, mut tw) = tokio::io::split(theirs);
    tw.write_all(&hello()).await.unwrap();
    // The agent reads 16 KiB per 100 ms (160 KiB/s: the 8 MiB budget
    // ahead of a ping takes almost a minute) and answers pings in order.
    let agent = tokio::spawn(async move {
        let mut acc: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = match tr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            acc.extend_from_slice(&buf[..n]);
            while acc.len() >= 4 {
                let len = u32::from_le_bytes(acc[..4].try_into().unwrap()) as usize;
                if acc.len() < 4 + len {
                    break;
                }
                let env: Envelope = postcard::from_bytes(&acc[4..4 + len]).unwrap();
                acc.drain(..4 + len);
                if matches!(env.body, Request::Ping) && env.id != 0 {
                    let pong = encode_frame(&Response {
                        id: env.id,
                        last: true,
                        result: Ok(Reply::Pong),
                    })
                    .unwrap();
                    if tw.write_all(&pong).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let client = Client::connect(r, w, Duration::from_secs(3)).await.unwrap();
    for fid in 0..24 {
        client.post(write_req(fid)).await.unwrap();
    }
    // Everything queued went through, slowly, and a ping after it is answered.
    let answered = tokio::time::timeout(Duration::from_secs(3600), client.call(Request::Ping))
        .await
        .expect("the slow link never delivered");
    assert!(matches!(answered, Ok(Reply::Pong)), "{answered:?}");
    assert!(client.closed().is_none(), "{:?}", client.closed());
    drop(client);
    agent.abort();
}
