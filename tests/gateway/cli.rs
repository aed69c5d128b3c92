//! The command line: `token`, `check-config`, `publish` in `--help`, and configuration errors.

use std::process::Command;

use epoch_testkit::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(gateway_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_subcommands() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["serve", "token", "check-config", "publish", "--config"] {
        assert!(out.contains(word), "{word} in {out}");
    }
}

#[test]
fn token_prints_a_guardian_shaped_token_for_the_configured_secret() {
    let jti = "5f0c6a2e-4b7d-4a43-9a8e-0b1a2c3d4e5f";
    let (code, out, err) = run(
        &["token", "--user", "42", "--ttl", "120", "--jti", jti],
        &[("EPOCH_GATEWAY__AUTH__SECRET", SECRET)],
    );
    assert_eq!(code, 0, "{err}");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS512);
    validation.set_audience(&["EpochtalkServer"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        out.trim(),
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("token verifies with the configured secret");
    let claims = data.claims;
    assert_eq!(claims["sub"], "42");
    assert_eq!(claims["jti"], jti);
    assert_eq!(claims["iss"], "EpochtalkServer");
    assert_eq!(claims["typ"], "access");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120
    );
}

#[test]
fn check_config_prints_effective_settings_with_secrets_redacted() {
    let (code, out, err) = run(
        &["check-config"],
        &[
            ("EPOCH_GATEWAY__AUTH__SECRET", "very-secret-value"),
            ("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "45"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let settings: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(settings["presence"]["ttl_secs"], 45);
    assert_eq!(settings["auth"]["secret"], "[redacted]");
    assert_eq!(settings["http"]["listen"], "127.0.0.1:4000");
    assert!(!out.contains("very-secret-value"));
    // Unset keys are shown too (null), so every key can be found.
    assert_eq!(
        settings["telemetry"]["otlp_protocol"],
        serde_json::Value::Null
    );
    let (code, out, err) = run(
        &["check-config"],
        &[("EPOCH_GATEWAY__TELEMETRY__OTLP_PROTOCOL", "GRPC")],
    );
    assert_eq!(code, 0, "{err}");
    let settings: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(settings["telemetry"]["otlp_protocol"], "grpc");
}

#[test]
fn a_config_file_is_layered_under_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[nats]\nsubject_prefix = \"fromfile\"\n[presence]\nttl_secs = 40\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = run(
        &["check-config", "--config", path],
        &[("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "50")],
    );
    assert_eq!(code, 0, "{err}");
    let settings: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(settings["nats"]["subject_prefix"], "fromfile");
    assert_eq!(settings["presence"]["ttl_secs"], 50);
    let (code, out, _) = run(&["check-config"], &[("EPOCH_GATEWAY_CONFIG", path)]);
    assert_eq!(code, 0);
    assert!(out.contains("fromfile"));
}

#[test]
fn bad_configuration_names_the_key_and_the_problem() {
    let production = [
        ("EPOCH_GATEWAY__ENVIRONMENT", "production"),
        ("EPOCH_GATEWAY__AUTH__SECRET", "s3cret"),
    ];
    let cases: [(&[(&str, &str)], &str); 15] = [
        (&production, "EPOCH_GATEWAY__HTTP__ALLOWED_ORIGINS"),
        (
            &[(
                "EPOCH_GATEWAY__HTTP__ALLOWED_ORIGINS",
                "https://x.example/path",
            )],
            "http.allowed_origins",
        ),
        (
            &[("EPOCH_GATEWAY__HTTP__LISTEN", "not an address")],
            "http.listen",
        ),
        (
            &[("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "soon")],
            "presence.ttl_secs",
        ),
        (
            &[("EPOCH_GATEWAY__PRESENCE__TTL_SECS", "1")],
            "EPOCH_GATEWAY__PRESENCE__TTL_SECS",
        ),
        (
            &[("EPOCH_GATEWAY__AUTH__ALGORITHM", "RS256")],
            "EPOCH_GATEWAY__AUTH__ALGORITHM",
        ),
        (
            &[("EPOCH_GATEWAY__NODE__ID", "a.b")],
            "EPOCH_GATEWAY__NODE__ID",
        ),
        (
            &[("EPOCH_GATEWAY__ENVIRONMENT", "production")],
            "EPOCH_GATEWAY__AUTH__SECRET",
        ),
        (
            &[
                ("EPOCH_GATEWAY__ENVIRONMENT", "production"),
                ("EPOCH_GATEWAY__HTTP__ALLOWED_ORIGINS", "forum.example"),
                ("EPOCH_GATEWAY__AUTH__SECRET", "change-me"),
            ],
            "placeholder",
        ),
        (
            &[("EPOCH_GATEWAY__RUNTIME__WORKER_THREADS", "0")],
            "EPOCH_GATEWAY__RUNTIME__WORKER_THREADS",
        ),
        (
            &[("EPOCH_GATEWAY__TELEMETRY__OTLP_PROTOCOL", "http/json")],
            "EPOCH_GATEWAY__TELEMETRY__OTLP_PROTOCOL): 'http/json' is not supported; use http/protobuf or grpc",
        ),
        (
            &[("EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT", "collector:4317")],
            "EPOCH_GATEWAY__TELEMETRY__OTLP_ENDPOINT",
        ),
        (
            &[("EPOCH_GATEWAY__PRESENCE__FEED", "sometimes")],
            "'sometimes' is not a feed mode; use off, authenticated or everyone",
        ),
        (
            &[("EPOCH_GATEWAY__PRESENCE__FEED_INTERVAL_MS", "10")],
            "EPOCH_GATEWAY__PRESENCE__FEED_INTERVAL_MS): must be between 50 and 60000",
        ),
        (
            &[("EPOCH_GATEWAY__PRESENCE__FEED_MAX_USERS", "0")],
            "EPOCH_GATEWAY__PRESENCE__FEED_MAX_USERS): must be between 1 and 1000000",
        ),
    ];
    for (env, expected) in cases {
        let (code, _, err) = run(&["check-config"], env);
        assert_ne!(code, 0, "{env:?}");
        assert!(err.contains(expected), "{env:?}: {err}");
    }
    // Secrets are taken verbatim, never parsed as numbers.
    let (code, out, _) = run(
        &["token", "--user", "1"],
        &[("EPOCH_GATEWAY__AUTH__SECRET", "0123")],
    );
    assert_eq!(code, 0);
    let key = jsonwebtoken::DecodingKey::from_secret(b"0123");
    let validation = {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS512);
        v.validate_aud = false;
        v
    };
    assert!(jsonwebtoken::decode::<serde_json::Value>(out.trim(), &key, &validation).is_ok());
}
