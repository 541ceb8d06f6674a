//! Errors as OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with
//! the HTTP status each deserves.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A request that ends in an error reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// OpenAI's error code (`context_length_exceeded`, `rate_limit_exceeded`, ...).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The same error, blaming request field `param`.
    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The error object, as sent in a reply body or as an event of a stream.
    pub fn to_json(&self) -> String {
        let body =
            Body { error: Inner { message: &self.message, kind: self.kind, param: self.param, code: self.code } };
        serde_json::to_string(&body).unwrap_or_else(|_| r#"{"error":{"message":"error"}}"#.to_string())
    }
}

impl From<vl_runtime::Error> for ApiError {
    fn from(e: vl_runtime::Error) -> Self {
        use vl_runtime::Error as E;
        let message = e.to_string();
        match e {
            E::Overloaded(_) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message,
                kind: "requests",
                param: None,
                code: Some("rate_limit_exceeded"),
            },
            E::ContextOverflow { .. } => Self { code: Some("context_length_exceeded"), ..Self::invalid(message) },
            E::Sampling(_) | E::Request(_) | E::Video(_) => Self::invalid(message),
            E::EngineStopped => Self { status: StatusCode::SERVICE_UNAVAILABLE, ..Self::internal(message) },
            _ => Self::internal(message),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's --max-body".to_string()
        } else {
            r.body_text()
        };
        Self { status, ..Self::invalid(message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.to_json())
                .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vl_runtime::error::Overload;

    #[test]
    fn runtime_errors_map_to_statuses() {
        let e = ApiError::from(vl_runtime::Error::Overloaded(Overload::NoRoom));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let e = ApiError::from(vl_runtime::Error::ContextOverflow { needed: 9, max_new: 1, limit: 8 });
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, Some("context_length_exceeded")));
        assert_eq!(ApiError::from(vl_runtime::Error::EngineStopped).status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn error_object_has_openai_fields() {
        let v: serde_json::Value = serde_json::from_str(&ApiError::invalid("bad").param("messages").to_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "messages");
        assert!(v["error"]["code"].is_null());
    }
}
