//! The sidecar's request heads (`sockpool::http::request`): any bytes either
//! ask for more, are refused with 400/431, or give a request whose canonical
//! form is one whole request that parses back to the same method and target,
//! with nothing the client sent beyond the checked fields. The incremental
//! scanner, fed the same bytes in two cuts, agrees with the one-shot parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockpool::http::request::{parse, HeadScanner, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks where the input is cut for the incremental scanner.
    let (cut, data) = match data.split_first() {
        Some((c, rest)) => (*c as usize, rest),
        None => return,
    };
    let whole = parse(data);
    match &whole {
        Err(r) => assert!(r.status == 400 || r.status == 431, "{r:?}"),
        Ok(None) => assert!(data.len() < MAX_HEAD_BYTES, "too long to be partial"),
        Ok(Some(req)) => {
            assert!(req.head_len <= data.len() && req.head_len <= MAX_HEAD_BYTES);
            assert!(req.target.starts_with('/'));
            let canonical = req.canonical();
            // One request, all of it, and nothing after it.
            let again = parse(&canonical)
                .expect("the canonical form is accepted")
                .expect("and complete");
            assert_eq!(again.head_len, canonical.len());
            assert_eq!(again.method, req.method);
            assert_eq!(again.target, req.target);
            assert_eq!(again.host.as_deref(), Some(req.host.as_deref().unwrap_or("localhost")));
            assert_eq!(again.authorization, req.authorization);
            // httparse, the strict parser, reads it the same way.
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut h = httparse::Request::new(&mut headers);
            assert_eq!(
                h.parse(&canonical).expect("httparse"),
                httparse::Status::Complete(canonical.len())
            );
            assert_eq!(h.method, Some(req.method.as_str()));
            assert_eq!(h.path, Some(req.target.as_str()));
        }
    }
    // The scanner across two reads finds the same end (or the same refusal).
    let cut = cut.min(data.len());
    let mut scanner = HeadScanner::default();
    let first = scanner.scan(&data[..cut]);
    let second = match first {
        Ok(None) => scanner.scan(data),
        other => other,
    };
    let fresh = HeadScanner::default().scan(data);
    match (&second, &fresh) {
        // A refusal found in the first cut may come before the second's end.
        (Err(_), _) if first.is_err() => {}
        _ => assert_eq!(second, fresh, "cut at {cut}"),
    }
});
