//! The chat page at `/`: the demo page of www/, compiled into the binary. Served without its wasm engine (the
//! `bitnet/` package), the page switches to its server mode by itself and chats through this server's
//! /v1/chat/completions (streamed). `--no-webui` leaves it out.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Each file of the page: its path on the server, its content type, its bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    ("/", HTML, include_bytes!("../../../www/index.html")),
    ("/index.html", HTML, include_bytes!("../../../www/index.html")),
    ("/app.js", JS, include_bytes!("../../../www/app.js")),
    ("/store.js", JS, include_bytes!("../../../www/store.js")),
    ("/markdown.js", JS, include_bytes!("../../../www/markdown.js")),
    ("/server.js", JS, include_bytes!("../../../www/server.js")),
    ("/style.css", "text/css; charset=utf-8", include_bytes!("../../../www/style.css")),
    ("/vendor/marked.esm.js", JS, include_bytes!("../../../www/vendor/marked.esm.js")),
    ("/vendor/purify.es.mjs", JS, include_bytes!("../../../www/vendor/purify.es.mjs")),
];
const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// GET routes for the page's files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    FILES.iter().fold(Router::new(), |router, &(path, content_type, bytes)| {
        let headers = [
            (header::CONTENT_TYPE, content_type),
            // The page changes with the binary: always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ];
        router.route(path, get(move || async move { (headers, bytes).into_response() }))
    })
}
