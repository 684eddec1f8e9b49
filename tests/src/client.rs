//! A small keep-alive HTTP/1.1 client that records the client-side truth the tracer must match:
//! request bytes on the wire, status, response bytes on the wire, SSE events.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
};

/// What one exchange looked like from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub status: u16,
    /// Bytes of the request on the wire (head + body).
    pub request_bytes: u64,
    /// Bytes of the response on the wire (head + framing + body).
    pub response_bytes: u64,
    /// `data:` SSE events that are not `[DONE]`.
    pub events: u64,
    /// Whether a `data: [DONE]` arrived.
    pub done: bool,
    /// The decoded body.
    pub body: Vec<u8>,
}

/// A `POST`: path, JSON body, extra headers.
pub type Post<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// One keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    /// Connects to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// The connection alone (one descriptor: the reader's copy is closed). Call it between
    /// exchanges, when nothing is buffered.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// The client's local port (identifies the connection in the tracer's view).
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map_or(0, |a| a.port())
    }

    /// Sends `POST path` with a JSON body and reads the whole response.
    pub fn post(
        &mut self,
        path: &str,
        body: &str,
        extra_headers: &[(&str, &str)],
    ) -> std::io::Result<Exchange> {
        let request = Self::request(path, body, extra_headers);
        self.stream.write_all(&request)?;
        let mut ex = self.read_response()?;
        ex.request_bytes = request.len() as u64;
        Ok(ex)
    }

    /// Pipelining: sends every request in one write, then reads the responses in order.
    pub fn pipeline(&mut self, requests: &[Post<'_>]) -> std::io::Result<Vec<Exchange>> {
        let wire: Vec<Vec<u8>> = requests
            .iter()
            .map(|(path, body, headers)| Self::request(path, body, headers))
            .collect();
        self.stream.write_all(&wire.concat())?;
        wire.iter()
            .map(|r| {
                let mut ex = self.read_response()?;
                ex.request_bytes = r.len() as u64;
                Ok(ex)
            })
            .collect()
    }

    fn request(path: &str, body: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in extra_headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        [head.as_bytes(), body.as_bytes()].concat()
    }

    fn line(&mut self, wire: &mut u64) -> std::io::Result<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        *wire += n as u64;
        Ok(line)
    }

    fn read_response(&mut self) -> std::io::Result<Exchange> {
        let mut wire = 0u64;
        let status_line = self.line(&mut wire)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        loop {
            let l = self.line(&mut wire)?;
            let t = l.trim_end();
            if t.is_empty() {
                break;
            }
            if let Some((k, v)) = t.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.line(&mut wire)?;
                let size =
                    usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                        .map_err(|_| std::io::Error::other("bad chunk size"))?;
                let mut chunk = vec![0u8; size + 2];
                self.reader.read_exact(&mut chunk)?;
                wire += chunk.len() as u64;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
            wire += n as u64;
        }
        let text = String::from_utf8_lossy(&body);
        let mut events = 0;
        let mut done = false;
        for l in text.lines() {
            if let Some(d) = l.strip_prefix("data:") {
                if d.trim() == "[DONE]" {
                    done = true;
                } else {
                    events += 1;
                }
            }
        }
        Ok(Exchange {
            status,
            request_bytes: 0,
            response_bytes: wire,
            events,
            done,
            body,
        })
    }
}
