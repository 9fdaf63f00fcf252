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
    for name in ["weightgate", "postgres", "mail", "minio", "minio-init"] {
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
    // Storage is the MinIO service, with the credentials MinIO is started with and the bucket
    // the init container creates.
    assert_eq!(
        settings.storage.backend,
        weightgate::config::StorageBackend::S3
    );
    let minio = &doc["services"]["minio"]["environment"];
    assert_eq!(
        settings.storage.s3_access_key_id,
        minio["MINIO_ROOT_USER"].as_str().unwrap()
    );
    assert_eq!(
        settings.storage.s3_secret_access_key.0,
        minio["MINIO_ROOT_PASSWORD"].as_str().unwrap()
    );
    assert_eq!(settings.storage.s3_endpoint, "http://minio:9000");
    let init = doc["services"]["minio-init"]["entrypoint"]
        .as_sequence()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        init.contains(&format!("local/{}", settings.storage.s3_bucket)),
        "{init}"
    );
    assert_eq!(settings.mail.smtp_host, "mail");
    assert!(!settings.mail.admin_emails.is_empty());
}
