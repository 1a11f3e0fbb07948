//! Sans-I/O request heads: strict parsing with `httparse`, and the canonical
//! request the front writes to tiny_http in place of the client's bytes.
//!
//! The front never forwards what a client sent. Two parsers that disagree about
//! where a request ends (a bare LF is a line end to one and not to the other)
//! make request smuggling; so this module accepts only what every HTTP/1.1
//! parser reads the same way (RFC 9112), rejects the rest with a status, and
//! [`Request::canonical`] writes a fresh request that says only what the routes
//! need: method, path and query, `Host`, `Authorization`, `Connection: close`.
//! No body is ever forwarded, so exactly one request reaches tiny_http per
//! client connection, by construction.
//!
//! Pure functions on bytes: no sockets, no clocks, no panics on any input;
//! property-tested (`tests/sidecar_request.rs`) and fuzzed (`fuzz/`, target
//! `request`).

/// Largest request head (request line + headers + blank line) accepted; more is a 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in a head; more is a 431.
pub const MAX_HEADERS: usize = 64;
/// Longest method accepted (the routes know GET and HEAD; anything else is a
/// 405 from them, but no method needs more than this).
pub const MAX_METHOD_BYTES: usize = 32;
/// Longest `Host` value accepted (a DNS name is at most 253, plus a port).
pub const MAX_HOST_BYTES: usize = 300;

/// A request head the front accepted: everything the routes use, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// An RFC 9110 token, at most [`MAX_METHOD_BYTES`].
    pub method: String,
    /// Path and query (origin-form), visible ASCII, starting with `/`.
    pub target: String,
    /// The `Host` value, visible ASCII; `None` if the client sent none.
    pub host: Option<String>,
    /// The `Authorization` value, printable ASCII, surrounding blanks trimmed.
    pub authorization: Option<String>,
    /// Bytes the head took in the client's buffer (through its blank line).
    pub head_len: usize,
}

/// Why a head was refused: the status to answer with and a short reason for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// 400 or 431.
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Reject {
    Reject {
        status: 400,
        reason,
    }
}

const TOO_LARGE: Reject = Reject {
    status: 431,
    reason: "request head too large",
};

/// Parses the head at the start of `buf`.
///
/// `Ok(None)`: no complete head yet, read more. `Ok(Some(_))`: a head to serve;
/// bytes after `head_len` are not part of it (they are never forwarded).
/// `Err(_)`: refuse the request with that status. Cost is linear in `buf`.
pub fn parse(buf: &[u8]) -> Result<Option<Request>, Reject> {
    let end = match HeadScanner::default().scan(buf)? {
        Some(end) => end,
        None if buf.len() >= MAX_HEAD_BYTES => return Err(TOO_LARGE),
        None => return Ok(None),
    };
    if end > MAX_HEAD_BYTES {
        return Err(TOO_LARGE);
    }
    let head = &buf[..end];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        Ok(_) => return Err(bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(bad("malformed request head")),
    }
    let method = req.method.ok_or(bad("no method"))?;
    if method.len() > MAX_METHOD_BYTES {
        return Err(bad("method too long"));
    }
    if !matches!(req.version, Some(0 | 1)) {
        return Err(bad("not HTTP/1.x"));
    }
    let target = origin_form(req.path.ok_or(bad("no target"))?)?;
    let mut host = None;
    let mut authorization = None;
    let mut content_length = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value.trim_ascii();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("Transfer-Encoding"));
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(bad("duplicate Content-Length"));
            }
            content_length = Some(decimal(value).ok_or(bad("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(bad("duplicate Host"));
            }
            let ok = !value.is_empty()
                && value.len() <= MAX_HOST_BYTES
                && value.iter().all(u8::is_ascii_graphic);
            host = Some(ascii(value).filter(|_| ok).ok_or(bad("bad Host"))?);
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Err(bad("duplicate Authorization"));
            }
            let ok = value.iter().all(|&b| b == b' ' || b.is_ascii_graphic());
            authorization = Some(
                ascii(value)
                    .filter(|_| ok)
                    .ok_or(bad("bad Authorization"))?,
            );
        }
    }
    // No endpoint takes a body, and a body is where a second request hides.
    if content_length.is_some_and(|n| n > 0) {
        return Err(bad("request body"));
    }
    Ok(Some(Request {
        method: method.to_owned(),
        target,
        host,
        authorization,
        head_len: end,
    }))
}

impl Request {
    /// The one request written to tiny_http: nothing the client sent passes
    /// through except the checked method, target, Host and Authorization.
    pub fn canonical(&self) -> Vec<u8> {
        let host = self.host.as_deref().unwrap_or("localhost");
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\n",
            self.method, self.target
        );
        if let Some(auth) = &self.authorization {
            out.push_str("Authorization: ");
            out.push_str(auth);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }

    /// The path without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Finds where a head ends (just after its blank line) across reads, checking
/// every byte on the way: a bare LF, a bare CR, a NUL or an obs-fold line
/// refuses the request at once, complete or not, so that no parser downstream
/// ever has to guess. Each byte is looked at once however the head arrives, so
/// a client dribbling a byte at a time costs linear time, not quadratic.
#[derive(Debug, Clone, Default)]
pub struct HeadScanner {
    /// Next byte to look at.
    pos: usize,
    /// Where the current line began.
    line_start: usize,
    /// A non-empty line (the request line) has been seen.
    saw_line: bool,
}

impl HeadScanner {
    /// Scans `buf` (the same buffer as last time, possibly longer) from where
    /// the last call stopped. `Ok(Some(end))`: the head is `buf[..end]`.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, Reject> {
        while let Some(&b) = buf.get(self.pos) {
            let i = self.pos;
            if i >= MAX_HEAD_BYTES {
                return Err(TOO_LARGE);
            }
            match b {
                b'\n' => {
                    if i == 0 || buf[i - 1] != b'\r' {
                        return Err(bad("bare LF"));
                    }
                    if i + 1 - self.line_start > 2 {
                        self.saw_line = true;
                    } else if self.saw_line {
                        return Ok(Some(i + 1));
                    }
                    // else: an empty line before the request line, which RFC
                    // 9112 §2.2 lets a server skip (and httparse does).
                    self.line_start = i + 1;
                }
                b'\r' => match buf.get(i + 1) {
                    Some(b'\n') => {}
                    Some(_) => return Err(bad("bare CR")),
                    // Wait for the next byte before judging this one.
                    None => return Ok(None),
                },
                0 => return Err(bad("NUL byte")),
                b' ' | b'\t' if i == self.line_start && self.saw_line => {
                    return Err(bad("obsolete line folding"));
                }
                _ => {}
            }
            self.pos += 1;
        }
        Ok(None)
    }
}

/// The path and query of a request target: origin-form as it is, absolute-form
/// (`http://host/path`, which servers must accept) cut down to its path.
fn origin_form(target: &str) -> Result<String, Reject> {
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("bad request target"));
    }
    if target.starts_with('/') {
        return Ok(target.to_owned());
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return Err(bad("bad request target"));
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Ok(rest[i..].to_owned()),
        Some(i) => Ok(format!("/{}", &rest[i..])),
        None => Ok("/".to_owned()),
    }
}

/// A Content-Length value: 1*DIGIT, no sign, no list, no overflow.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn ascii(value: &[u8]) -> Option<String> {
    std::str::from_utf8(value)
        .ok()
        .filter(|s| s.is_ascii())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &[u8]) -> u16 {
        match parse(head) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(r) => r.status,
        }
    }

    #[test]
    fn plain_requests_parse_and_canonicalise() {
        let r = parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer  t \r\nX: y\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path(), "/metrics");
        assert_eq!(
            r.canonical(),
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer  t\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(r.head_len, 73);
        let r = parse(b"HEAD http://x:9/a?b HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.method.as_str(), r.target.as_str()), ("HEAD", "/a?b"));
        assert_eq!(
            parse(b"GET http://x HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .target,
            "/"
        );
        assert_eq!(status(b"\r\nGET / HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), 200);
    }

    #[test]
    fn partial_heads_ask_for_more() {
        for partial in [
            &b""[..],
            b"GET",
            b"GET / HTTP/1.1\r",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"\r\n\r\n",
        ] {
            assert_eq!(parse(partial), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn the_doubtful_is_refused() {
        for head in [
            &b"GET /nope HTTP/1.1\r\nHost: x\r\nX-A: a\nContent-Length: 36\r\n\r\n"[..],
            b"GET / HTTP/1.1\n\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization: Bearer \xc3\xa9\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /a\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"G\x1bT / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nName : v\r\n\r\n",
        ] {
            assert_eq!(status(head), 400, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn size_limits_are_431() {
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 10, b'a');
        assert_eq!(status(&long), 431);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
    }
}
