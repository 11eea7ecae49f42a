//! The gateway's errors in OpenAI's shape: [`OpenAiError`] with the status a client acts on,
//! the mapping from a mesh failure ([`OpenAiError::from_mesh`]), the API key's refusal, and
//! [`OpenAiJson`], a JSON body whose rejection is an [`OpenAiError`] too.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::schema::{ErrorBody, ErrorDetail};
use crate::dispatch::{CallFailure, FailureClass};

/// An error in OpenAI's shape, with the status code a client acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl OpenAiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "bad_request",
            message: message.into(),
        }
    }

    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        OpenAiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    /// A request body over the API's cap ([`crate::api::state::MAX_REQUEST_BODY`]).
    pub(crate) fn payload_too_large() -> Self {
        OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!(
                "the request body is over {} bytes, the most this node's API accepts",
                crate::api::state::MAX_REQUEST_BODY
            ),
        )
    }

    pub(crate) fn invalid_api_key() -> Self {
        OpenAiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: "invalid_api_key",
            message: "missing or wrong API key (send Authorization: Bearer <key>)".into(),
        }
    }

    /// Maps a mesh failure to its HTTP status ([`FailureClass::http_status`]) and OpenAI's
    /// error type and code.
    pub(crate) fn from_mesh(failure: CallFailure) -> Self {
        let class = failure.class();
        let (kind, code) = match class {
            FailureClass::NotFound => ("invalid_request_error", "model_not_found"),
            FailureClass::BadRequest => ("invalid_request_error", "bad_request"),
            FailureClass::Unauthorized => ("permission_error", "unauthorized"),
            FailureClass::Overloaded => ("rate_limit_error", "overloaded"),
            FailureClass::DeadlineExceeded => ("timeout_error", "deadline_exceeded"),
            FailureClass::Network => ("api_error", "mesh_unreachable"),
            FailureClass::Internal => ("api_error", "internal"),
        };
        OpenAiError {
            status: class.http_status(),
            kind,
            code,
            message: failure.message,
        }
    }

    /// The error's code (`model_not_found`, `overloaded`, …), as the Responses API reports it.
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// The error's message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The body: in a response, or as the last event of a stream that failed after it began.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
                param: None,
                kind: self.kind,
            },
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

/// Malformed JSON, a wrong field type, a missing content type: all a 400, with axum's text.
impl From<JsonRejection> for OpenAiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return OpenAiError::payload_too_large();
        }
        OpenAiError::bad_request(rejection.body_text())
    }
}

/// A JSON request body; a body that does not parse is answered with an [`OpenAiError`].
pub(crate) struct OpenAiJson<T>(pub T);

impl<T, S> FromRequest<S> for OpenAiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = OpenAiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(OpenAiJson(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{ErrorCode, WireError};

    fn json_of(e: &OpenAiError) -> String {
        serde_json::to_string(&e.body()).unwrap()
    }

    #[test]
    fn every_failure_class_has_its_status_type_and_code() {
        // One failure of each class, as the dispatcher reports them.
        let node = |code| CallFailure::remote(WireError::new(code, "why"));
        let cases = [
            (
                node(ErrorCode::UnknownModel),
                FailureClass::NotFound,
                404,
                "invalid_request_error",
                "model_not_found",
            ),
            (
                node(ErrorCode::BadRequest),
                FailureClass::BadRequest,
                400,
                "invalid_request_error",
                "bad_request",
            ),
            (
                node(ErrorCode::Unauthorized),
                FailureClass::Unauthorized,
                403,
                "permission_error",
                "unauthorized",
            ),
            (
                node(ErrorCode::Overloaded),
                FailureClass::Overloaded,
                429,
                "rate_limit_error",
                "overloaded",
            ),
            (
                node(ErrorCode::DeadlineExceeded),
                FailureClass::DeadlineExceeded,
                504,
                "timeout_error",
                "deadline_exceeded",
            ),
            (
                CallFailure::network(ErrorCode::Internal, "why"),
                FailureClass::Network,
                502,
                "api_error",
                "mesh_unreachable",
            ),
            (
                node(ErrorCode::Internal),
                FailureClass::Internal,
                500,
                "api_error",
                "internal",
            ),
            (
                node(ErrorCode::Unknown),
                FailureClass::Internal,
                500,
                "api_error",
                "internal",
            ),
        ];
        for (failure, class, status, kind, code) in cases {
            assert_eq!(failure.class(), class);
            let e = OpenAiError::from_mesh(failure);
            assert_eq!(e.status().as_u16(), status, "{class:?}");
            assert_eq!(
                json_of(&e),
                format!(
                    r#"{{"error":{{"code":"{code}","message":"why","param":null,"type":"{kind}"}}}}"#
                ),
                "{class:?}"
            );
        }
    }

    #[test]
    fn the_body_is_byte_for_byte_what_clients_saw() {
        // The shape and key order of the `json!` body this replaced.
        let old = serde_json::json!({ "error": {
            "message": "bad \"x\"", "type": "invalid_request_error", "param": null, "code": "bad_request" } });
        let e = OpenAiError::bad_request("bad \"x\"");
        assert_eq!(json_of(&e), old.to_string());
        assert_eq!(
            json_of(&OpenAiError::invalid_api_key()),
            r#"{"error":{"code":"invalid_api_key","message":"missing or wrong API key (send Authorization: Bearer <key>)","param":null,"type":"invalid_request_error"}}"#
        );
    }

    #[tokio::test]
    async fn a_body_that_does_not_parse_is_an_openai_400() {
        #[derive(Debug, serde::Deserialize)]
        struct Body {
            #[allow(dead_code)]
            model: String,
        }
        let request = |body: &'static str, json: bool| {
            let mut r = Request::builder().method("POST").uri("/");
            if json {
                r = r.header("content-type", "application/json");
            }
            r.body(axum::body::Body::from(body)).unwrap()
        };
        let err = OpenAiJson::<Body>::from_request(request("{not json", true), &())
            .await
            .err()
            .unwrap();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(
            err.message
                .starts_with("Failed to parse the request body as JSON"),
            "{err:?}"
        );
        let err = OpenAiJson::<Body>::from_request(request(r#"{"model":1}"#, true), &())
            .await
            .err()
            .unwrap();
        assert_eq!(
            (err.status(), err.code),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        assert!(err.message.contains("model: invalid type"), "{err:?}");
        // No content type: axum's 415 becomes the 400 clients always got.
        let err = OpenAiJson::<Body>::from_request(request(r#"{"model":"m"}"#, false), &())
            .await
            .err()
            .unwrap();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let OpenAiJson(body) =
            OpenAiJson::<Body>::from_request(request(r#"{"model":"m","extra":1}"#, true), &())
                .await
                .unwrap();
        assert_eq!(body.model, "m");
    }
}
