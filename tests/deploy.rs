//! No Docker engine runs here, so the deployment files are checked by reading them: every
//! `WEIGHTGATE__…` variable in docker-compose.yml is one the binary accepts, and the ports,
//! services and database URL agree with each other.

use weightgate::config::{DatabaseUrl, MailTransport, Settings};

#[test]
fn docker_compose_matches_the_configuration_the_binary_accepts() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    for name in ["weightgate", "postgres", "mail"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let env: Vec<(String, String)> = doc["services"]["weightgate"]["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(env.iter().all(|(k, _)| k.starts_with("WEIGHTGATE__")));
    let settings = Settings::load_from(None, env).expect("compose's settings are accepted");

    let port = settings.bind_addr().unwrap().port();
    let ports: Vec<String> = doc["services"]["weightgate"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
        "published port {ports:?} reaches bind {port}"
    );

    match settings.database_url().unwrap() {
        DatabaseUrl::Postgres(url) => {
            let pg = &doc["services"]["postgres"]["environment"];
            let expected = format!(
                "postgres://{}:{}@postgres:5432/{}",
                pg["POSTGRES_USER"].as_str().unwrap(),
                pg["POSTGRES_PASSWORD"].as_str().unwrap(),
                pg["POSTGRES_DB"].as_str().unwrap()
            );
            assert_eq!(url, expected);
        }
        other => panic!("compose should use PostgreSQL, not {other:?}"),
    }
    assert_eq!(settings.mail.transport, MailTransport::Smtp);
    assert_eq!(settings.mail.smtp_host, "mail");
    assert!(!settings.mail.admin_emails.is_empty());
}
