//! Direct send: a large download written to the socket by weightgate itself.
//!
//! actix-web's HTTP/1 encoder copies every body byte into its own write buffer before the
//! socket write copies it again. For a weight file that is a third copy of each verified byte
//! (after the read from storage and before the kernel's), measured at 12 % of the server's
//! CPU for one stream. Here the verified chunks go from the stream's buffer to the socket.
//!
//! The connection stays actix's; this writes on a duplicate of its descriptor, which is only
//! correct when actix has nothing buffered for the connection and writes nothing while the
//! handler runs:
//! - the request is the connection's first, so no earlier response can still sit in actix's
//!   write buffer (with pipelining, a later request's handler runs before the earlier answer
//!   has left);
//! - it has no `Expect` header (actix would queue a `100 Continue` before calling the
//!   handler);
//! - it is HTTP/1.x.
//!
//! The response says `Connection: close`. Once its last byte is written, the socket's sending
//! side is shut down, so the empty response the handler then returns to actix (for its
//! metrics and logs) never reaches the client: actix's write of it fails, and it closes the
//! connection. A client that wants another file opens a new connection, as after any
//! `Connection: close`.

use std::cell::Cell;
use std::os::fd::{BorrowedFd, RawFd};

use actix_web::http::{Method, Version, header};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// What the server knows of a connection: its socket, and how many requests came on it.
/// Put in the connection's data when it is accepted.
pub struct Conn {
    fd: RawFd,
    requests: Cell<u64>,
}

impl Conn {
    pub fn new(fd: RawFd) -> Conn {
        Conn {
            fd,
            requests: Cell::new(0),
        }
    }

    /// Counts a request on this connection (the middleware calls it for every request).
    pub fn count_request(&self) {
        self.requests.set(self.requests.get() + 1);
    }
}

/// The request id the middleware gave this request, for the response headers written here.
#[derive(Clone)]
pub struct RequestId(pub String);

/// A socket to write this response on, when it is to be sent directly: `len` body bytes to a
/// GET that opened its connection (see the module's notes). `None` leaves it to actix.
pub fn socket(req: &HttpRequest, min_bytes: u64, len: u64) -> Option<tokio::net::TcpStream> {
    if min_bytes == 0
        || len < min_bytes
        || req.method() != Method::GET
        || !matches!(req.version(), Version::HTTP_11 | Version::HTTP_10)
        || req.headers().contains_key(header::EXPECT)
    {
        return None;
    }
    let conn = req.conn_data::<Conn>()?;
    if conn.requests.get() != 1 {
        return None;
    }
    // SAFETY: `fd` is the descriptor of this request's connection, which actix keeps open at
    // least until the handler's future is dropped, and the handler is running now.
    let borrowed = unsafe { BorrowedFd::borrow_raw(conn.fd) };
    let own = match borrowed.try_clone_to_owned() {
        Ok(fd) => std::net::TcpStream::from(fd),
        Err(e) => {
            tracing::debug!(error = %e, "no direct send: cannot duplicate the socket");
            return None;
        }
    };
    // The descriptor shares actix's file description, which is non-blocking already.
    match tokio::net::TcpStream::from_std(own) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "no direct send: cannot register the socket");
            None
        }
    }
}

/// The response head: actix's status and headers, with the length, the date and
/// `Connection: close` that actix would otherwise add.
fn head(resp: &HttpResponse, len: u64, request_id: Option<&str>) -> Vec<u8> {
    let status = resp.status();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in resp.headers() {
        line(name.as_str().as_bytes(), value.as_bytes());
    }
    line(b"content-length", len.to_string().as_bytes());
    line(b"connection", b"close");
    line(
        b"date",
        httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
    );
    if let Some(id) = request_id {
        line(b"x-request-id", id.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes the head and then every chunk of `body` on `sock`, and ends the connection. A write
/// that fails (the client left) or a chunk that fails (storage) cuts the response short, as it
/// does on actix's path; `body` is dropped before the socket is shut down, so whatever it
/// records on drop comes first. Returns the response to hand actix: the same status, no body.
pub async fn send<B>(
    mut sock: tokio::net::TcpStream,
    mut resp: HttpResponseBuilder,
    len: u64,
    mut body: B,
    request_id: Option<&str>,
) -> HttpResponse
where
    B: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let built = resp.finish();
    let head = head(&built, len, request_id);
    if sock.write_all(&head).await.is_ok() {
        while let Some(Ok(chunk)) = body.next().await {
            if sock.write_all(&chunk).await.is_err() {
                break;
            }
        }
    }
    drop(body);
    let _ = sock.shutdown().await;
    HttpResponse::build(built.status()).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_carries_the_headers_length_and_close() {
        let resp = HttpResponse::PartialContent()
            .insert_header(("etag", "\"abc\""))
            .insert_header(("content-range", "bytes 0-9/100"))
            .finish();
        let text = String::from_utf8(head(&resp, 10, Some("r1"))).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{text}"
        );
        for line in [
            "etag: \"abc\"\r\n",
            "content-range: bytes 0-9/100\r\n",
            "content-length: 10\r\n",
            "connection: close\r\n",
            "x-request-id: r1\r\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from {text}");
        }
        assert!(text.contains("\r\ndate: "), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert_eq!(text.matches("\r\n\r\n").count(), 1, "{text}");
    }
}
