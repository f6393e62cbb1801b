//! `bitnet serve-www`: serves the built demo site (`bash web/build.sh` writes it to `target/www`) on
//! 127.0.0.1. Static files only, std only. Every response carries the cross-origin isolation headers
//! (COOP + COEP) without which a browser gives a page no SharedArrayBuffer, hence no wasm threads, and
//! the MIME types browsers insist on (`application/wasm` for streaming compilation, JavaScript for modules).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use bitnet_engine::Error;
use clap::Args;

#[derive(Args)]
pub struct ServeWwwArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The built site.
    #[arg(long, default_value = "target/www")]
    dir: PathBuf,
}

pub fn serve_www(a: ServeWwwArgs) -> Result<(), Error> {
    let io = |what: &str, e: std::io::Error| Error::Invalid(format!("{what}: {e}"));
    if !a.dir.join("index.html").is_file() {
        return Err(Error::Invalid(format!(
            "{} has no index.html: build the site with `bash web/build.sh`",
            a.dir.display()
        )));
    }
    let root = a.dir.canonicalize().map_err(|e| io(&a.dir.display().to_string(), e))?;
    let listener = TcpListener::bind(("127.0.0.1", a.port)).map_err(|e| io(&format!("127.0.0.1:{}", a.port), e))?;
    let port = listener.local_addr().map_err(|e| io("local address", e))?.port();
    println!("serving {} at http://127.0.0.1:{port}/", root.display());
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            // A client that goes away mid-response is its own business.
            let _ = handle(stream, &root);
        });
    }
    Ok(())
}

/// One request, one response, then the connection closes.
fn handle(stream: TcpStream, root: &Path) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.by_ref().take(8192).read_line(&mut request_line)?;
    // Skip the headers: nothing in them changes the answer.
    let mut line = String::new();
    let mut header_bytes = 0;
    while reader.by_ref().take(8192).read_line(&mut line)? > 0 && line != "\r\n" && line != "\n" {
        header_bytes += line.len();
        if header_bytes > 65536 {
            return respond(stream, 431, "text/plain", b"headers too large", false);
        }
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return respond(stream, 405, "text/plain", b"only GET and HEAD", false);
    }
    let Some(path) = resolve(root, target) else {
        return respond(stream, 404, "text/plain", b"not found", head);
    };
    let Ok(mut file) = std::fs::File::open(&path) else {
        return respond(stream, 404, "text/plain", b"not found", head);
    };
    let len = file.metadata()?.len();
    let mut out = std::io::BufWriter::new(stream);
    write_head(&mut out, 200, mime(&path), len)?;
    if !head {
        std::io::copy(&mut file, &mut out)?;
    }
    out.flush()
}

/// The file a request target names inside `root`, or None (outside the root, missing, malformed).
/// A directory means its index.html.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next()?;
    let decoded = percent_decode(path.strip_prefix('/')?)?;
    let relative = Path::new(&decoded);
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return None; // "..", absolute paths, "." (and an empty path, handled below)
    }
    let mut full = root.join(relative);
    if decoded.is_empty() || full.is_dir() {
        full.push("index.html");
    }
    // Symbolic links must not lead out of the site either.
    let full = full.canonicalize().ok()?;
    (full.starts_with(root) && full.is_file()).then_some(full)
}

fn percent_decode(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "ts" => "text/plain; charset=utf-8", // .d.ts files, for reading
        "md" | "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        _ => "application/octet-stream", // .gguf and anything else
    }
}

fn write_head(out: &mut impl Write, status: u16, content_type: &str, len: u64) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\
         Cross-Origin-Opener-Policy: same-origin\r\nCross-Origin-Embedder-Policy: require-corp\r\n\
         Cross-Origin-Resource-Policy: same-origin\r\nX-Content-Type-Options: nosniff\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    )
}

fn respond(stream: TcpStream, status: u16, content_type: &str, body: &[u8], head: bool) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(stream);
    write_head(&mut out, status, content_type, body.len() as u64)?;
    if !head {
        out.write_all(body)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_resolve_inside_the_site_only() {
        let dir = std::env::temp_dir().join(format!("bitnet-serve-www-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub dir")).unwrap();
        std::fs::write(dir.join("index.html"), "x").unwrap();
        std::fs::write(dir.join("sub dir/a.wasm"), "x").unwrap();
        let root = dir.canonicalize().unwrap();
        assert_eq!(resolve(&root, "/"), Some(root.join("index.html")));
        assert_eq!(resolve(&root, "/?prompt=hi&n=20"), Some(root.join("index.html")));
        assert_eq!(resolve(&root, "/sub%20dir/a.wasm"), Some(root.join("sub dir/a.wasm")));
        assert_eq!(mime(&root.join("sub dir/a.wasm")), "application/wasm");
        for bad in
            ["/../etc/passwd", "/sub%20dir/../../x", "//etc/passwd", "/%2e%2e/x", "/missing.js", "/%zz", "nohash"]
        {
            assert_eq!(resolve(&root, bad), None, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
