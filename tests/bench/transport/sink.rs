//! The benchmark's webhook: a lean HTTP/1.1 receiver (keep-alive) that counts deliveries,
//! checks their order per connection, times the payloads of a latency phase, and answers a
//! status the benchmark sets (503 holds delivery at the agent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::sync::watch;

#[derive(Default)]
struct Recorder {
    /// Highest `Relay-Seq` seen per path and connection.
    last_seq: HashMap<String, u64>,
    /// Arrival times by payload index while a latency phase records.
    arrivals: Option<Vec<Option<Instant>>>,
}

struct State {
    status: AtomicU16,
    delivered: watch::Sender<u64>,
    out_of_order: AtomicU64,
    recorder: Mutex<Recorder>,
}

/// A running sink.
pub struct Sink {
    /// Where to POST.
    pub url: String,
    state: Arc<State>,
}

fn index_of(body: &[u8]) -> Option<usize> {
    std::str::from_utf8(body.get(..10)?).ok()?.parse().ok()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let at = Instant::now();
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // Each pair delivers to its own path: its sequence numbers start again at 1.
    let conn = header("relay-connection").map(|c| format!("{} {c}", req.uri().path()));
    let seq = header("relay-seq").and_then(|s| s.parse::<u64>().ok());
    let body = req.into_body().collect().await?.to_bytes();
    let status = state.status.load(Ordering::Relaxed);
    if status == 200 {
        let mut r = state.recorder.lock().unwrap();
        if let (Some(conn), Some(seq)) = (conn, seq) {
            let prev = r.last_seq.entry(conn).or_insert(0);
            if seq <= *prev {
                state.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *prev = seq;
        }
        if let (Some(arrivals), Some(i)) = (r.arrivals.as_mut(), index_of(&body)) {
            if let Some(slot) = arrivals.get_mut(i) {
                slot.get_or_insert(at);
            }
        }
        drop(r);
        state.delivered.send_modify(|n| *n += 1);
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if status == 503 {
        resp.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    Ok(resp)
}

impl Sink {
    /// Listens on an ephemeral loopback port.
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let state = Arc::new(State {
            status: AtomicU16::new(200),
            delivered: watch::channel(0).0,
            out_of_order: AtomicU64::new(0),
            recorder: Mutex::default(),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Sink { url, state }
    }

    /// Deliveries answered 2xx so far.
    pub fn delivered(&self) -> u64 {
        *self.state.delivered.borrow()
    }

    /// Deliveries that came with a `Relay-Seq` not above the connection's previous one.
    pub fn out_of_order(&self) -> u64 {
        self.state.out_of_order.load(Ordering::Relaxed)
    }

    /// Waits until `n` deliveries were answered 2xx (at most ten minutes).
    pub async fn wait_for(&self, n: u64, what: &str) {
        let mut rx = self.state.delivered.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|d| *d >= n)).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "{what}: only {} of {n} delivered",
            self.delivered()
        );
    }

    /// The status answered from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::Relaxed);
    }

    /// Records the arrival of payloads `0..n` from now on.
    pub fn record(&self, n: usize) {
        self.state.recorder.lock().unwrap().arrivals = Some(vec![None; n]);
    }

    /// The arrivals recorded, and stops recording.
    pub fn take_recorded(&self) -> Vec<Option<Instant>> {
        self.state.recorder.lock().unwrap().arrivals.take().unwrap_or_default()
    }
}
