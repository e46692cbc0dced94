//! A minimal PostgreSQL client for the real-cluster tests: protocol 3.0
//! startup with `trust` authentication and the simple query protocol, text
//! results only. Enough to ask a server where a connection landed and to
//! keep a session open across a failover.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct Pg {
    stream: TcpStream,
}

/// A row of text values (`None` for NULL).
pub type Row = Vec<Option<String>>;

impl Pg {
    /// Connects and authenticates as `postgres` to database `postgres`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Pg, String> {
        let stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut pg = Pg { stream };
        let mut body = Vec::new();
        body.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
        for (k, v) in [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", "patroni-proxy-test"),
        ] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        pg.stream
            .write_all(&msg)
            .map_err(|e| format!("startup: {e}"))?;
        loop {
            let (tag, data) = pg.read_message()?;
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(data[..4].try_into().unwrap());
                    if code != 0 {
                        return Err(format!(
                            "authentication method {code} not supported (use trust)"
                        ));
                    }
                }
                b'E' => return Err(error_text(&data)),
                b'Z' => return Ok(pg),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Runs `sql`; returns the rows of the last result.
    pub fn query(&mut self, sql: &str) -> Result<Vec<Row>, String> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.stream
            .write_all(&msg)
            .map_err(|e| format!("send: {e}"))?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, data) = self.read_message()?;
            match tag {
                b'T' => rows.clear(),
                b'D' => rows.push(data_row(&data)),
                b'E' => error = Some(error_text(&data)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// `(pg_is_in_recovery(), inet_server_port())` of the server reached.
    pub fn whereami(&mut self) -> Result<(bool, u16), String> {
        let rows = self.query("SELECT pg_is_in_recovery(), inet_server_port()")?;
        let row = rows.first().ok_or("no row")?;
        let recovery = row[0].as_deref() == Some("t");
        let port = row[1]
            .as_deref()
            .and_then(|p| p.parse().ok())
            .ok_or("no port")?;
        Ok((recovery, port))
    }

    fn read_message(&mut self) -> Result<(u8, Vec<u8>), String> {
        let mut head = [0u8; 5];
        self.stream
            .read_exact(&mut head)
            .map_err(|e| format!("connection lost: {e}"))?;
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap());
        if !(4..=1 << 24).contains(&len) {
            return Err(format!("bad message length {len}"));
        }
        let mut data = vec![0u8; len as usize - 4];
        self.stream
            .read_exact(&mut data)
            .map_err(|e| format!("connection lost: {e}"))?;
        Ok((head[0], data))
    }
}

/// Connects and asks where it landed, in one go.
pub fn whereami(addr: SocketAddr, timeout: Duration) -> Result<(bool, u16), String> {
    Pg::connect(addr, timeout)?.whereami()
}

fn data_row(data: &[u8]) -> Row {
    let n = u16::from_be_bytes([data[0], data[1]]) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(data[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let end = at + len as usize;
            row.push(Some(String::from_utf8_lossy(&data[at..end]).into_owned()));
            at = end;
        }
    }
    row
}

/// The `M` (message) field of an ErrorResponse, with its SQLSTATE.
fn error_text(data: &[u8]) -> String {
    let mut msg = String::new();
    let mut code = String::new();
    for field in data.split(|b| *b == 0) {
        match field.first() {
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    format!("{msg} (SQLSTATE {code})")
}
