//! `mesh token issue|inspect|revoke`: capability tokens, offline, with the home's node key.

use std::io::Read;
use std::process::ExitCode;

use mesh_node::auth::revocation::{self, REVOKED_FILE};
use mesh_node::auth::token::{self, TokenRequest};
use mesh_node::auth::unix_now;
use mesh_node::network::PeerId;
use mesh_node::Home;
use mesh_protocol::{SignedToken, TokenClaims};

use crate::args::TokenCommand;
use crate::output::{self, failed, Exit};

pub fn run(home: &Home, command: &TokenCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Issue {
            to,
            models,
            expires,
            not_before,
            max_requests,
        } => issue(
            home,
            to,
            models,
            expires,
            not_before.as_deref(),
            *max_requests,
            json,
        ),
        TokenCommand::Inspect { token } => inspect(token, json),
        TokenCommand::Revoke { id } => revoke(home, id, json),
    }
}

fn issue(
    home: &Home,
    to: &str,
    models: &[String],
    expires: &str,
    not_before: Option<&str>,
    max_requests: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let subject: PeerId = to
        .parse()
        .map_err(|_| failed(Exit::BadRequest, format!("--to: {to:?} is not a peer id")))?;
    for m in models {
        mesh_protocol::ids::validate_model_name(m)
            .map_err(|e| failed(Exit::BadRequest, format!("--model: {e}")))?;
    }
    let bad = |flag: &str, e: String| failed(Exit::BadRequest, format!("{flag}: {e}"));
    let now = unix_now();
    let not_before =
        now + parse_duration(not_before.unwrap_or("0s")).map_err(|e| bad("--not-before", e))?;
    let lifetime = parse_duration(expires).map_err(|e| bad("--expires", e))?;
    if lifetime == 0 {
        return Err(bad("--expires", "must be longer than 0s".into()));
    }
    let identity = super::load_identity(home)?;
    let request = TokenRequest {
        subject,
        models: models.to_vec(),
        not_before,
        expires: not_before.saturating_add(lifetime),
        max_requests,
    };
    let token = token::issue(&identity, &request).map_err(|e| failed(Exit::BadRequest, e))?;
    let claims = token.decode_claims()?;
    if json {
        let mut v = claims_json(&claims);
        v["token"] = token.to_text().into();
        output::json_line(&v)?;
    } else {
        outln!("{}", token.to_text());
        eprintln!(
            "mesh: token {} for {subject}, {}, valid until unix time {}{}",
            claims.id_hex(),
            models_text(&claims),
            claims.expires,
            claims
                .max_requests
                .map(|n| format!(", at most {n} requests"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(text: &str, json: bool) -> anyhow::Result<ExitCode> {
    let text = read_arg(text)?;
    let token =
        SignedToken::from_text(&text).map_err(|e| failed(Exit::BadRequest, e.to_string()))?;
    let claims = token
        .decode_claims()
        .map_err(|e| failed(Exit::BadRequest, e.to_string()))?;
    let opened = token::open(&token);
    let now = unix_now();
    let time = if now < claims.not_before {
        "not yet valid"
    } else if now >= claims.expires {
        "expired"
    } else {
        "valid now"
    };
    if json {
        let mut v = claims_json(&claims);
        v["signature_valid"] = opened.is_ok().into();
        v["time"] = time.into();
        output::json_line(&v)?;
    } else {
        let peer =
            |b: &[u8]| PeerId::from_bytes(b).map_or("(not a peer id)".into(), |p| p.to_string());
        outln!("id:           {}", claims.id_hex());
        outln!("issuer:       {}", peer(&claims.issuer));
        outln!("subject:      {}", peer(&claims.subject));
        // `mesh token show` reads tokens others made: their text is not trusted.
        outln!(
            "models:       {}",
            output::escape_controls(&models_text(&claims), false)
        );
        outln!("not before:   {} (unix)", claims.not_before);
        outln!("expires:      {} (unix), {time}", claims.expires);
        match claims.max_requests {
            Some(n) => outln!("max requests: {n}"),
            None => outln!("max requests: unlimited"),
        }
        match &opened {
            Ok(_) => outln!("signature:    valid (signed by the issuer)"),
            Err(e) => outln!("signature:    INVALID ({e})"),
        }
    }
    match opened {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(failed(
            Exit::Failure,
            format!("the token does not verify: {e}"),
        )),
    }
}

fn revoke(home: &Home, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let id = if id
        .trim()
        .starts_with(mesh_protocol::token::TOKEN_TEXT_PREFIX)
    {
        let token =
            SignedToken::from_text(id).map_err(|e| failed(Exit::BadRequest, e.to_string()))?;
        token
            .decode_claims()
            .map_err(|e| failed(Exit::BadRequest, e.to_string()))?
            .id_hex()
    } else {
        id.trim().to_string()
    };
    let bytes = revocation::parse_id(&id).map_err(|e| failed(Exit::BadRequest, e))?;
    let path = home.root().join(REVOKED_FILE);
    revocation::revoke(
        &path,
        &bytes,
        &format!("# revoked at unix time {}", unix_now()),
    )?;
    if json {
        output::json_line(
            &serde_json::json!({ "revoked": id, "file": path.display().to_string() }),
        )?;
    } else {
        outln!("revoked {id} (in {})", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn models_text(claims: &TokenClaims) -> String {
    if claims.models.is_empty() {
        "every model".into()
    } else {
        claims.models.join(", ")
    }
}

fn claims_json(claims: &TokenClaims) -> serde_json::Value {
    let peer = |b: &[u8]| PeerId::from_bytes(b).map(|p| p.to_string()).ok();
    serde_json::json!({
        "id": claims.id_hex(),
        "issuer": peer(&claims.issuer),
        "subject": peer(&claims.subject),
        "models": claims.models,
        "not_before": claims.not_before,
        "expires": claims.expires,
        "max_requests": claims.max_requests,
    })
}

/// The argument itself, or stdin for `-` (at most 64 KiB).
pub fn read_arg(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut text = String::new();
    std::io::stdin().take(64 * 1024).read_to_string(&mut text)?;
    Ok(text)
}

/// `30d`, `12h`, `90m`, `45s` (or a bare number of seconds) in seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30d, 12h, 90m or 45s"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("90m"), Ok(5_400));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
