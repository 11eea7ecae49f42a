//! What a captured call keeps of its text: secrets replaced, and at most a cap of bytes.
//!
//! Capture is off unless the operator turns it on (`PUT /v1/mesh/capture`); even then the
//! inspector must not become a place where credentials pile up. A capability token in the
//! request is never kept. In the prompt and the answer, text that looks like a credential is
//! replaced with `[redacted]`: API keys of the common services (`sk-…`, `AKIA…`, `ghp_…`,
//! `xox…-`), bearer headers, mesh's own tokens and receipts (`mtk1.…`, `mrc1.…`), PEM private
//! key blocks, and the value after `password=` / `secret:` and the like. It is a net for the
//! usual shapes, not a guarantee: docs/security.md says so.

use std::sync::LazyLock;

use regex::Regex;

/// The most bytes of text a captured call keeps of its request, and again of its answer.
pub const CAPTURE_CAP: usize = 16 * 1024;

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

static SECRETS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?s)-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\z)",
        r"|\bsk-[A-Za-z0-9_\-]{16,}",
        r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}",
        r"|\bgithub_pat_[A-Za-z0-9_]{20,}",
        r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}",
        r"|\b(?:mtk1|mrc1)\.[A-Za-z0-9_\-\.=]{16,}",
        r"|\bglpat-[A-Za-z0-9_\-]{20,}",
    ))
    .expect("a valid pattern")
});

/// `Bearer X`, `password=X`, `api_key: X`…: the name is kept, the value replaced.
static NAMED_SECRETS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)\b(bearer\s+|(?:password|passwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|token)\s*[:=]\s*"?)[^\s"',;]{6,}"#,
    )
    .expect("a valid pattern")
});

/// `text` with what looks like a secret replaced.
pub fn redact(text: &str) -> String {
    let once = SECRETS.replace_all(text, REDACTED);
    NAMED_SECRETS
        .replace_all(&once, |c: &regex::Captures| format!("{}{REDACTED}", &c[1]))
        .into_owned()
}

/// Text kept up to a budget of bytes shared by the parts of one capture.
#[derive(Debug)]
pub struct Budget {
    left: usize,
    /// Some text did not fit.
    pub truncated: bool,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        Budget {
            left: bytes,
            truncated: false,
        }
    }

    /// `text` redacted, then cut to what is left of the budget (at a character boundary).
    pub fn take(&mut self, text: &str) -> String {
        let text = redact(text);
        if text.len() <= self.left {
            self.left -= text.len();
            return text;
        }
        let mut end = self.left;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.left -= end;
        self.truncated = true;
        text[..end].to_string()
    }

    pub fn exhausted(&self) -> bool {
        self.left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tokens_and_private_keys_are_replaced() {
        let text = "use sk-proj-abcdefghijklmnopqrstuv and AKIAIOSFODNN7EXAMPLE, \
                    ghp_abcdefghijklmnopqrstuvwxyz0123 or xoxb-1234567890-abcdef; \
                    mtk1.eyJhbGciOiJFZERTQSJ9abcdef.sig";
        let out = redact(text);
        for secret in ["sk-proj", "AKIAIOSFODNN7", "ghp_abc", "xoxb-", "mtk1."] {
            assert!(!out.contains(secret), "{secret} kept in {out}");
        }
        assert_eq!(out.matches(REDACTED).count(), 5, "{out}");
        assert!(out.starts_with("use [redacted] and"));
    }

    #[test]
    fn a_pem_private_key_goes_whole() {
        let text = "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\nAAAA\n-----END OPENSSH PRIVATE KEY-----\nthanks";
        assert_eq!(redact(text), "key:\n[redacted]\nthanks");
        let cut = "-----BEGIN PRIVATE KEY-----\nMIIEv";
        assert_eq!(redact(cut), REDACTED);
    }

    #[test]
    fn named_values_keep_their_name() {
        assert_eq!(
            redact("Authorization: Bearer abc.def.ghi123"),
            "Authorization: Bearer [redacted]"
        );
        assert_eq!(
            redact("password=hunter22 and api_key: \"k-123456\""),
            "password=[redacted] and api_key: \"[redacted]\""
        );
    }

    #[test]
    fn ordinary_text_is_untouched() {
        let text = "Write a haiku about tokens, secrets and passwords. The password is short.";
        assert_eq!(redact(text), text);
    }

    #[test]
    fn the_budget_cuts_at_a_character_boundary_and_says_so() {
        let mut budget = Budget::new(5);
        assert_eq!(budget.take("ab"), "ab");
        assert!(!budget.truncated);
        assert_eq!(budget.take("céé"), "cé");
        assert!(budget.truncated);
        assert!(budget.exhausted());
        assert_eq!(budget.take("more"), "");
    }
}
