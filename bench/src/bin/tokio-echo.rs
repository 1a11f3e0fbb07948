//! The idiomatic tokio baselines: echo, and the ack protocol with line framing
//! (`BufReader::read_until` + `write_all`, flushing when no input is buffered).
//!
//! `tokio-echo --listen 127.0.0.1:0 --mode echo|ack-line --threads 1` prints
//! `listening on ADDR` on stdout. No limits, no timeouts, no metrics: a baseline,
//! not a server to deploy (a client sending an endless line grows its buffer).

use std::io;
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy)]
enum Mode {
    Echo,
    AckLine,
}

/// Per-connection read buffer: tokio's own `BufReader` default. (A bigger one helps
/// bulk transfers but costs every idle connection as much.)
const ECHO_BUF: usize = 8 * 1024;

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; ECHO_BUF];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn ack_line(mut stream: TcpStream) -> io::Result<()> {
    let (reader, writer) = stream.split();
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::new(writer);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return writer.flush().await;
        }
        let ended = line.last() == Some(&b'\n');
        let mut body = &line[..];
        if ended {
            body = &body[..body.len() - 1];
            body = body.strip_suffix(b"\r").unwrap_or(body);
        }
        writer.write_all(b"Server received \"").await?;
        writer.write_all(body).await?;
        writer
            .write_all(if ended { b"\"\n" } else { b"\"" })
            .await?;
        // Pipelined requests already buffered get their replies in one write.
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

async fn serve(listen: String, mode: Mode) -> io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // EMFILE and the like: keep serving the connections we have.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let result = match mode {
                Mode::Echo => echo(stream).await,
                Mode::AckLine => ack_line(stream).await,
            };
            if let Err(e) = result {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("{peer}: {e}");
                }
            }
        });
    }
}

fn main() -> ExitCode {
    let run = || -> Result<(), String> {
        let flags = sockpool_bench::Flags::parse(&["listen", "mode", "threads"])?;
        let mode = match flags.get("mode", "echo") {
            "echo" => Mode::Echo,
            "ack-line" => Mode::AckLine,
            other => return Err(format!("--mode {other:?}: use echo or ack-line")),
        };
        let threads: usize = flags
            .get("threads", "1")
            .parse()
            .ok()
            .filter(|t| *t >= 1)
            .ok_or("--threads needs a number of at least 1")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let listen = flags.get("listen", "127.0.0.1:0").to_string();
        // The accept loop runs on a worker, not on the main thread, so `--threads 1`
        // really is one thread doing the work.
        runtime
            .block_on(async move { tokio::spawn(serve(listen, mode)).await })
            .map_err(|e| format!("server task: {e}"))?
            .map_err(|e| e.to_string())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokio-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
