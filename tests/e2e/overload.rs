//! The server's own limits, against the real binary: bounded admission (server-wide and
//! per model), deadlines, and clients that send slowly or not at all.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Reply, Server, iris_request, repository};

const SETOSA: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

/// `n` requests to `path` at once.
fn at_once(server: &Server, path: &str, n: usize) -> Vec<Reply> {
    let row = iris_request(&[SETOSA]);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| server.post_json(path, &row)))
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

#[test]
fn beyond_the_server_limit_requests_get_503_and_the_server_stays_healthy() {
    let models = repository(&["slow"]);
    let server = Server::start(
        models.path(),
        "[server]\nmax_in_flight = 2\ninference_threads = 1\n",
    );
    let replies = at_once(&server, "/v2/models/slow/infer", 16);
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert!(!refused.is_empty(), "16 clients never passed a limit of 2");
    assert!(served >= 2, "{served} served");
    assert_eq!(refused.len() + served, 16);
    for reply in &refused {
        assert_eq!(reply.headers["retry-after"], "1");
        let error = reply.error(503);
        assert!(error.contains("server.max_in_flight"), "{error}");
    }
    assert_eq!(
        server.metric(
            "modelyard_server_rejections_total",
            &[("reason", "in_flight_limit")]
        ),
        refused.len() as f64
    );
    // The turned-away requests held nothing: the server answers as before.
    for _ in 0..3 {
        server
            .post_json("/v2/models/slow/infer", &iris_request(&[SETOSA]))
            .ok();
    }
    assert_eq!(server.get("/v2/health/ready").status, 200);
    assert!(
        server.logs().contains("request turned away"),
        "{}",
        server.logs()
    );
}

#[test]
fn a_model_limit_turns_its_own_requests_away_and_leaves_the_others_alone() {
    let models = repository(&["slow"]);
    std::fs::write(models.path().join("slow/model.toml"), "max_in_flight = 1\n").unwrap();
    let server = Server::start(models.path(), "[server]\ninference_threads = 2\n");
    let (slow, iris) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| at_once(&server, "/v2/models/slow/infer", 8));
        let iris = scope.spawn(|| at_once(&server, "/v2/models/iris/infer", 8));
        (slow.join().unwrap(), iris.join().unwrap())
    });
    assert!(iris.iter().all(|r| r.status == 200));
    let refused: Vec<&Reply> = slow.iter().filter(|r| r.status == 503).collect();
    assert!(!refused.is_empty(), "8 clients never passed a limit of 1");
    for reply in &refused {
        let error = reply.error(503);
        assert!(
            error.contains("model 'slow' version 1 is overloaded")
                && error.contains("max_in_flight in model.toml"),
            "{error}"
        );
        assert_eq!(reply.headers["retry-after"], "1");
    }
    let labels = [("model", "slow"), ("reason", "in_flight_limit")];
    assert_eq!(
        server.metric("modelyard_queue_rejections_total", &labels),
        refused.len() as f64
    );
    server
        .post_json("/v2/models/slow/infer", &iris_request(&[SETOSA]))
        .ok();
}

#[test]
fn a_deadline_answers_504_and_the_run_still_counts() {
    let models = repository(&["slow"]);
    // A server deadline far shorter than one run of `slow` (tens of milliseconds).
    let server = Server::start(models.path(), "[server]\nrequest_timeout_ms = 2\n");
    let runs = || {
        server.metric(
            "modelyard_inference_duration_seconds_count",
            &[("model", "slow"), ("version", "1")],
        )
    };
    let before = runs();
    let error = server
        .post_json("/v2/models/slow/infer", &iris_request(&[SETOSA]))
        .error(504);
    assert!(
        error.contains("'slow' gave no answer") && error.contains("server.request_timeout_ms"),
        "{error}"
    );
    assert_eq!(
        server.metric(
            "modelyard_server_rejections_total",
            &[("reason", "deadline")]
        ),
        1.0
    );
    // The run went on to its end and was counted against the model.
    server.wait_until("the abandoned run is counted", || runs() > before);
    // A request's own, longer deadline does not outlast the server's.
    let mut patient = iris_request(&[SETOSA]);
    patient["parameters"] = json!({"timeout": 60_000_000});
    let error = server
        .post_json("/v2/models/slow/infer", &patient)
        .error(504);
    assert!(error.contains("deadline"), "{error}");
}

/// Opens a connection and sends the start of a request head, as a slowloris client does.
fn trickler(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    stream
}

/// Whether the server closed the connection (reading ends or fails).
fn closed(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buffer = [0u8; 512];
    match stream.read(&mut buffer) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn slow_clients_are_cut_off_and_do_not_crowd_out_the_others() {
    let models = repository(&[]);
    let server = Server::start(
        models.path(),
        "[server]\nheader_read_timeout_ms = 1000\nbody_read_timeout_ms = 1000\n",
    );
    let mut trickling: Vec<TcpStream> = (0..200).map(|_| trickler(&server.addr)).collect();
    let mut silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    // While they trickle a header line every 100 ms, everyone else is served.
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(600) {
        for stream in &mut trickling {
            let _ = stream.write_all(b"X-Slow: 1\r\n");
        }
        for _ in 0..5 {
            server
                .post_json("/v2/models/iris/infer", &iris_request(&[SETOSA]))
                .ok();
            served += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served >= 5);
    // Past the header timeout, every one of them is closed by the server.
    server.wait_until("the slow and silent connections are closed", || {
        trickling.retain_mut(|s| {
            let _ = s.write_all(b"X-Slow: 1\r\n");
            !closed(s)
        });
        silent.retain_mut(|s| !closed(s));
        trickling.is_empty() && silent.is_empty()
    });

    // A body that stops halfway is answered 408 once its time is up.
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream
        .write_all(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\"",
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("server.body_read_timeout_ms"), "{reply}");
    assert_eq!(
        server.metric(
            "modelyard_server_rejections_total",
            &[("reason", "body_timeout")]
        ),
        1.0
    );
    assert_eq!(server.get("/v2/health/ready").status, 200);
}
