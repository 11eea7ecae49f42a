//! Ollama's errors: `{"error": "..."}` with the status a client acts on. A mesh failure's
//! status is [`FailureClass::http_status`](crate::dispatch::FailureClass::http_status), the
//! one mapping the OpenAI gateway uses too. Also the API-key check in Ollama's shape, and
//! [`OllamaJson`], a JSON body read whatever its content type (as Ollama does).

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::schema::ErrorBody;
use crate::dispatch::CallFailure;

/// An error in Ollama's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaError {
    status: StatusCode,
    message: String,
}

impl OllamaError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub(crate) fn not_implemented(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::NOT_IMPLEMENTED,
            message: message.into(),
        }
    }

    /// A mesh failure, with the status of its class.
    pub(crate) fn from_mesh(failure: CallFailure) -> Self {
        OllamaError {
            status: failure.class().http_status(),
            message: failure.message,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
        }
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A JSON request body, read whatever the content type says (`curl -d` sends a form type;
/// Ollama reads the body as JSON anyway). A body that does not parse is a 400.
pub(crate) struct OllamaJson<T>(pub T);

impl<T, S> FromRequest<S> for OllamaJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = OllamaError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| OllamaError::bad_request(e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(OllamaJson)
            .map_err(|e| OllamaError::bad_request(format!("invalid request body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::FailureClass;
    use mesh_protocol::{ErrorCode, WireError};

    #[test]
    fn every_failure_class_has_its_status_and_ollamas_body() {
        let node = |code| CallFailure::remote(WireError::new(code, "why"));
        let cases = [
            (node(ErrorCode::UnknownModel), FailureClass::NotFound, 404),
            (node(ErrorCode::BadRequest), FailureClass::BadRequest, 400),
            (
                node(ErrorCode::Unauthorized),
                FailureClass::Unauthorized,
                403,
            ),
            (node(ErrorCode::Overloaded), FailureClass::Overloaded, 429),
            (
                node(ErrorCode::DeadlineExceeded),
                FailureClass::DeadlineExceeded,
                504,
            ),
            (
                CallFailure::network(ErrorCode::Internal, "why"),
                FailureClass::Network,
                502,
            ),
            (node(ErrorCode::Internal), FailureClass::Internal, 500),
        ];
        for (failure, class, status) in cases {
            assert_eq!(failure.class(), class);
            let openai = crate::openai::OpenAiError::from_mesh(failure.clone());
            let e = OllamaError::from_mesh(failure);
            assert_eq!(e.status().as_u16(), status, "{class:?}");
            assert_eq!(e.status(), openai.status(), "one mapping for both APIs");
            assert_eq!(
                serde_json::to_string(&e.body()).unwrap(),
                r#"{"error":"why"}"#
            );
        }
    }

    #[tokio::test]
    async fn a_body_is_json_whatever_its_content_type() {
        #[derive(Debug, serde::Deserialize)]
        struct Body {
            model: String,
        }
        let request = |body: &'static str, kind: &str| {
            Request::builder()
                .method("POST")
                .uri("/")
                .header("content-type", kind)
                .body(axum::body::Body::from(body))
                .unwrap()
        };
        let form = "application/x-www-form-urlencoded";
        let OllamaJson(body) =
            OllamaJson::<Body>::from_request(request(r#"{"model":"m"}"#, form), &())
                .await
                .unwrap();
        assert_eq!(body.model, "m");
        let err = OllamaJson::<Body>::from_request(request("{nope", "application/json"), &())
            .await
            .err()
            .unwrap();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(
            err.body().error.starts_with("invalid request body"),
            "{err:?}"
        );
    }
}
