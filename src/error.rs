//! The one error type of the library and the one place that maps it to an HTTP answer:
//! a status, a stable JSON code, a human sentence, and on Hugging Face paths the
//! `X-Error-Code` / `X-Error-Message` headers the official client reads.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

/// Which exception the Hugging Face client should raise for this error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubCode {
    GatedRepo,
    RepoNotFound,
    RevisionNotFound,
    EntryNotFound,
}

impl HubCode {
    pub fn as_str(self) -> &'static str {
        match self {
            HubCode::GatedRepo => "GatedRepo",
            HubCode::RepoNotFound => "RepoNotFound",
            HubCode::RevisionNotFound => "RevisionNotFound",
            HubCode::EntryNotFound => "EntryNotFound",
        }
    }
}

#[derive(Debug)]
pub struct Error {
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `token_expired`.
    pub code: &'static str,
    /// A sentence for a person; never internal detail on 5xx.
    pub message: String,
    pub hub: Option<HubCode>,
    /// Extra headers (e.g. `X-Repo-Commit` on EntryNotFound, `Content-Range` on 416).
    pub headers: Vec<(HeaderName, String)>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Error {
            status,
            code,
            message: message.into(),
            hub: None,
            headers: Vec::new(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A validation error that names the offending field.
    pub fn invalid_field(field: &str, why: impl fmt::Display) -> Self {
        Self::bad_request("invalid_field", format!("{field}: {why}"))
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A failure whose detail is logged here, once, and never shown to the client.
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Something went wrong on the server; it has been logged.",
        )
    }

    pub fn hub(mut self, code: HubCode) -> Self {
        self.hub = Some(code);
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for Error {}

/// Header values cannot hold newlines or non-visible ASCII; keep the sentence readable anyway.
fn header_safe(s: &str) -> HeaderValue {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status);
        if let Some(hub) = self.hub {
            resp.insert_header((HeaderName::from_static("x-error-code"), hub.as_str()));
            resp.insert_header((
                HeaderName::from_static("x-error-message"),
                header_safe(&self.message),
            ));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.insert_header((
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"Authentication required\", charset=\"UTF-8\"",
            ));
        }
        for (name, value) in &self.headers {
            resp.insert_header((name.clone(), header_safe(value)));
        }
        resp.json(serde_json::json!({ "error": self.code, "message": self.message }))
    }
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::NotFound => Error::not_found("not_found", "Not found."),
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            ) => Error::conflict(
                "conflict",
                "This conflicts with a change made at the same moment; try again.",
            ),
            other => Error::internal(format!("database: {other}")),
        }
    }
}

impl From<diesel::r2d2::PoolError> for Error {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        tracing::warn!(error = %e, "database pool exhausted or unreachable");
        Error::unavailable(
            "database_unavailable",
            "The database is not answering; try again shortly.",
        )
    }
}

impl From<actix_web::error::BlockingError> for Error {
    fn from(e: actix_web::error::BlockingError) -> Self {
        Error::internal(format!("blocking task: {e}"))
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::internal(format!("storage: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(format!("io: {e}"))
    }
}
