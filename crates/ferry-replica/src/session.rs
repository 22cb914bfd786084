//! Sessions of replication: replay's and the admin commands' connections to either side,
//! each set up so that values are written out (COPY, json) and read back the same way on both
//! sides, whatever the servers' defaults.

use ferry_connect::{ConnInfo, Session};

use crate::error::{ReplicaError, ResultExt};

/// Settings every replication session uses, so values are written out (COPY) and read
/// (json_populate_record) the same way on both sides, whatever the servers' defaults.
pub const SESSION_SETTINGS: &str = "set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'; \
     set extra_float_digits = 3; set bytea_output = 'hex'; set timezone = 'UTC'; \
     set lc_monetary = 'C'";

/// Connects one side (`side` is "provider" or "subscriber", for messages) as
/// `application_name`, with [`SESSION_SETTINGS`].
pub async fn open_session(
    conninfo: &ConnInfo,
    side: &str,
    application_name: &str,
) -> Result<Session, ReplicaError> {
    let session = ferry_connect::connect(conninfo, application_name)
        .await
        .map_err(|e| ReplicaError::connect(side, e))?;
    session
        .client()
        .batch_execute(SESSION_SETTINGS)
        .await
        .with_context(|| format!("setting up the {side} session"))?;
    Ok(session)
}
