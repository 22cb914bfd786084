//! TLS and SCRAM-SHA-256 against a real cluster whose pg_hba.conf accepts TCP only as
//! `hostssl ... scram-sha-256`, with a certificate from a throwaway CA.

use std::path::PathBuf;

use ferry_connect::{connect, ConnInfo, ConnectError};
use ferry_testkit::{error_chain as chain, Cluster, TestCertificates};
use tokio::sync::OnceCell;

const PASSWORD: &str = "pa ss'w0rd-of-the-test";

struct TlsCluster {
    cluster: Cluster,
    ca: PathBuf,
    /// a CA that did not sign the server's certificate
    other_ca: PathBuf,
}

async fn tls_cluster() -> &'static TlsCluster {
    static CLUSTER: OnceCell<TlsCluster> = OnceCell::const_new();
    CLUSTER
        .get_or_init(|| async {
            let cluster = Cluster::start().expect("cluster");
            let ca = cluster
                .enable_tls_and_scram(PASSWORD)
                .await
                .expect("tls and scram");
            let other_ca = cluster.socket_dir().join("other-ca.crt");
            std::fs::write(&other_ca, TestCertificates::generate().unwrap().ca_cert).unwrap();
            TlsCluster {
                cluster,
                ca,
                other_ca,
            }
        })
        .await
}

fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

async fn try_connect(extra: &str) -> Result<ferry_connect::Session, ConnectError> {
    let c = tls_cluster().await;
    let conninfo = c.cluster.tcp_conninfo("postgres", "postgres", extra);
    connect(&ConnInfo::parse(&conninfo).unwrap(), "ferry tls test").await
}

#[tokio::test]
async fn verify_full_with_the_right_ca_and_a_scram_password_connects_encrypted() {
    let c = tls_cluster().await;
    let extra = format!(
        "sslmode=verify-full sslrootcert={} password={}",
        quoted(c.ca.to_str().unwrap()),
        quoted(PASSWORD)
    );
    let session = try_connect(&extra).await.expect("verify-full connects");
    let row = session
        .client()
        .query_one(
            "select ssl, (select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = current_user)
               from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is encrypted");
    assert!(row.get::<_, bool>(1), "the password is stored as SCRAM");
}

#[tokio::test]
async fn require_encrypts_without_a_root_file_and_verify_ca_ignores_the_name() {
    let c = tls_cluster().await;
    let password = format!("password={}", quoted(PASSWORD));
    let session = try_connect(&format!(
        "sslmode=require sslrootcert=/nonexistent/root.crt {password}"
    ))
    .await
    .expect("require connects without checking");
    assert!(session
        .client()
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[]
        )
        .await
        .unwrap()
        .get::<_, bool>(0));

    // a name the certificate is not made out to: verify-ca passes, verify-full does not
    let other_name = |mode: &str| {
        format!(
            "host=ferry-not-the-name hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={} {password}",
            c.cluster.port(),
            quoted(c.ca.to_str().unwrap())
        )
    };
    connect(
        &ConnInfo::parse(&other_name("verify-ca")).unwrap(),
        "ferry tls test",
    )
    .await
    .expect("verify-ca does not check the name");
    let err = connect(
        &ConnInfo::parse(&other_name("verify-full")).unwrap(),
        "ferry tls test",
    )
    .await
    .err()
    .expect("verify-full checks the name");
    assert!(chain(&err).contains("certificate"), "{}", chain(&err));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let c = tls_cluster().await;
    let err = try_connect(&format!(
        "sslmode=verify-full sslrootcert={} password={}",
        quoted(c.other_ca.to_str().unwrap()),
        quoted(PASSWORD)
    ))
    .await
    .err()
    .expect("another CA's certificate is refused");
    let text = chain(&err);
    assert!(text.contains("certificate"), "{text}");
    assert!(
        err.hint()
            .is_some_and(|hint| hint.contains("check sslrootcert")),
        "{err}"
    );
    assert!(!text.contains(PASSWORD), "the password leaks: {text}");
}

#[tokio::test]
async fn plain_tcp_and_wrong_passwords_are_refused_without_showing_the_password() {
    let err = try_connect(&format!("sslmode=disable password={}", quoted(PASSWORD)))
        .await
        .err()
        .expect("plain TCP is rejected by pg_hba.conf");
    assert!(chain(&err).contains("pg_hba.conf"), "{}", chain(&err));

    let wrong = "not-the-password-42";
    let err = try_connect(&format!("sslmode=require password={wrong}"))
        .await
        .err()
        .expect("a wrong password is refused");
    let text = chain(&err);
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains(wrong), "the password leaks: {text}");
}

#[tokio::test]
async fn a_missing_root_file_for_verify_full_says_what_to_do() {
    let err = try_connect("sslmode=verify-full sslrootcert=/nonexistent/ca.pem")
        .await
        .err()
        .expect("no root file");
    let text = chain(&err);
    assert!(
        text.contains("/nonexistent/ca.pem") && text.contains("sslmode=require"),
        "{text}"
    );
    assert!(err.is_configuration());
}
