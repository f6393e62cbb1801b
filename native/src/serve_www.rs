//! `bitnet serve-www`: serves the built demo site (`bash web/build.sh` writes it to `target/www`) on
//! 127.0.0.1, through tower-http's `ServeDir` on the same connection loop as `bitnet serve` (a bounded
//! number of connections, header deadlines, no thread per connection). Every response carries the
//! cross-origin isolation headers (COOP + COEP) without which a browser gives a page no
//! SharedArrayBuffer, hence no wasm threads. Only files inside the site are served, no dotfiles.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bitnet_engine::Error;
use clap::Args;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

#[derive(Args)]
pub struct ServeWwwArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The built site.
    #[arg(long, default_value = "target/www")]
    dir: PathBuf,
}

/// What every response carries: cross-origin isolation (for wasm threads), no MIME sniffing, revalidation.
const HEADERS: [(&str, &str); 5] = [
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-embedder-policy", "require-corp"),
    ("cross-origin-resource-policy", "same-origin"),
    ("x-content-type-options", "nosniff"),
    ("cache-control", "no-cache"),
];

pub fn serve_www(a: ServeWwwArgs) -> Result<(), Error> {
    let io = |what: &str, e: std::io::Error| Error::Invalid(format!("{what}: {e}"));
    if !a.dir.join("index.html").is_file() {
        return Err(Error::Invalid(format!(
            "{} has no index.html: build the site with `bash web/build.sh`",
            a.dir.display()
        )));
    }
    let root = a.dir.canonicalize().map_err(|e| io(&a.dir.display().to_string(), e))?;
    let mut app = Router::new()
        .fallback_service(ServeDir::new(&root))
        .layer(middleware::from_fn_with_state(Arc::new(root.clone()), only_site_files));
    for (name, value) in HEADERS {
        let (name, value) = (HeaderName::from_static(name), HeaderValue::from_static(value));
        app = app.layer(SetResponseHeaderLayer::overriding(name, value));
    }
    // The model file is tens of megabytes: a whole connection may take minutes, not forever.
    let limits = crate::http::Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        connection_timeout: Some(Duration::from_secs(600)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
        .map_err(|e| io("runtime", e))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port))
            .await
            .map_err(|e| io(&format!("127.0.0.1:{}", a.port), e))?;
        let port = listener.local_addr().map_err(|e| io("local address", e))?.port();
        println!("serving {} at http://127.0.0.1:{port}/", root.display());
        std::io::Write::flush(&mut std::io::stdout()).map_err(|e| io("stdout", e))?;
        crate::http::serve(listener, app, limits, std::future::pending()).await;
        Ok(())
    })
}

/// GET and HEAD of files inside the site only (see `resolve`); everything else is a 404 or 405.
async fn only_site_files(State(root): State<Arc<PathBuf>>, req: Request, next: Next) -> Response {
    if !matches!(req.method().as_str(), "GET" | "HEAD") {
        return (StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD").into_response();
    }
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let Some(path) = resolve(&root, &target) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let mut response = next.run(req).await;
    // TypeScript declarations are for reading (a guess from the extension would say video).
    if path.extension().is_some_and(|e| e == "ts") {
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    response
}

/// The file a request target names inside `root`, or None (outside the root, missing, malformed).
/// A directory means its index.html.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next()?;
    let decoded = percent_decode(path.strip_prefix('/')?)?;
    let relative = Path::new(&decoded);
    // No "..", absolute paths or "." (an empty path is handled below), and no dotfiles (.git, .env, ...).
    let plain = |c: Component| matches!(c, Component::Normal(name) if !name.as_encoded_bytes().starts_with(b"."));
    if !relative.components().all(plain) {
        return None;
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
        std::fs::write(dir.join(".env"), "SECRET=1").unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join(".git/config"), "x").unwrap();
        for bad in [
            "/../etc/passwd",
            "/sub%20dir/../../x",
            "//etc/passwd",
            "/%2e%2e/x",
            "/missing.js",
            "/%zz",
            "nohash",
            "/.env",
            "/%2eenv",
            "/.git/config",
        ] {
            assert_eq!(resolve(&root, bad), None, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
