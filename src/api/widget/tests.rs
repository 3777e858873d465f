//! The widget's routes in process: content types, cache validation, the page's policy and that the
//! page loads nothing from elsewhere.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::{paths, router, Embedding, PAGE, SCRIPT, STYLE};

async fn get(
    embedding: &Embedding,
    path: &str,
    etag: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut b = Request::builder().uri(path);
    if let Some(tag) = etag {
        b = b.header("if-none-match", tag);
    }
    let response = router(embedding)
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn each_file_is_served_with_its_type_and_revalidated_by_etag() {
    let e = Embedding::default();
    for (path, content_type) in paths() {
        assert!(!path.starts_with("/v1"), "{path} is not part of the API");
        let (status, h, body) = get(&e, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(h["content-type"], content_type, "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert!(!body.is_empty());
        let tag = h["etag"].to_str().unwrap().to_owned();
        let (status, h2, body) = get(&e, path, Some(&format!("\"x\", {tag}"))).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(h2["etag"], tag.as_str());
        assert!(body.is_empty());
        let (status, _, _) = get(&e, path, Some("\"stale\"")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn the_page_is_framed_only_by_its_own_origin_unless_configured() {
    let (_, h, _) = get(&Embedding::default(), PAGE, None).await;
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("form-action 'none'"), "{csp}");
    assert!(csp.ends_with("frame-ancestors 'self'"), "{csp}");

    let e = Embedding {
        frame_ancestors: vec![
            "https://crm.example.com".into(),
            "https://*.example.org".into(),
        ],
        cors_origins: Vec::new(),
    };
    let (_, h, _) = get(&e, PAGE, None).await;
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.ends_with("frame-ancestors 'self' https://crm.example.com https://*.example.org"),
        "{csp}"
    );
}

#[tokio::test]
async fn the_page_loads_only_its_own_files_and_nothing_inline() {
    let (_, _, html) = get(&Embedding::default(), PAGE, None).await;
    // Its script and style sheet, by relative URL (so a path prefix in front of callgate works).
    assert!(
        html.contains(&format!("src=\"{}\"", &SCRIPT[1..])),
        "{html}"
    );
    assert!(
        html.contains(&format!("href=\"{}\"", &STYLE[1..])),
        "{html}"
    );
    for banned in [
        "http://",
        "https://",
        "<style",
        "style=",
        "onclick",
        "onload",
        "javascript:",
    ] {
        assert!(!html.contains(banned), "the page contains {banned}");
    }
    assert_eq!(html.matches("<script").count(), 1);
    let (_, _, js) = get(&Embedding::default(), SCRIPT, None).await;
    for banned in [
        "EventSource",
        "localStorage",
        "console.",
        "innerHTML",
        "eval(",
        "http://",
        "https://",
    ] {
        assert!(!js.contains(banned), "the script uses {banned}");
    }
    assert!(js.contains("sessionStorage"));
    let (_, _, css) = get(&Embedding::default(), STYLE, None).await;
    assert!(
        !css.contains("url(") && !css.contains("@import"),
        "the style sheet loads something"
    );
}
