//! How to run a container image's program: the part of its OCI config `keelctl build` keeps
//! at [`PATH`] in the image, and what keel's init makes of it ([`launch`], pure).

use serde::{Deserialize, Serialize};

/// Where the run config lives in a built image.
pub const PATH: &str = "/etc/keel/image.json";
/// The kernel modules keel's init loads, one absolute `.ko` path per line, in order.
pub const MODULES: &str = "/etc/keel/modules.load";
/// `PATH` for a program when the image's config sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The OCI config's `Entrypoint`, `Cmd`, `Env`, `WorkingDir` and `User`, as named there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct RunConfig {
    /// `Entrypoint`.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// `Env` (`K=V`).
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `User` (`NAME`, `UID`, `UID:GID`, `NAME:GROUP`).
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The environment, `K=V`, `PATH` always set.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// `User` as given (resolved against the image's `/etc/passwd` by the caller).
    pub user: Option<String>,
}

/// The program `cfg` runs: `Entrypoint` followed by `Cmd` (either may be missing), its
/// environment with `PATH` defaulted, the working directory (`/` when unset). `None` when
/// the image names nothing to run.
pub fn launch(cfg: &RunConfig) -> Option<Launch> {
    let mut argv: Vec<String> = cfg.entrypoint.clone().unwrap_or_default();
    argv.extend(cfg.cmd.clone().unwrap_or_default());
    if argv.is_empty() || argv[0].is_empty() {
        return None;
    }
    let mut env: Vec<(String, String)> = cfg
        .env
        .iter()
        .flatten()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    Some(Launch {
        argv,
        env,
        cwd: cfg
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: cfg.user.clone().filter(|u| !u.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches() {
        let cfg: RunConfig = serde_json::from_str(
            r#"{"Entrypoint":["/bin/app","-v"],"Cmd":["serve"],"Env":["A=1","PATH=/x"],"WorkingDir":"/srv","User":"1000:1000"}"#,
        )
        .unwrap();
        let l = launch(&cfg).unwrap();
        assert_eq!(l.argv, ["/bin/app", "-v", "serve"]);
        assert_eq!(
            l.env,
            [("A".into(), "1".into()), ("PATH".into(), "/x".into())]
        );
        assert_eq!(
            (l.cwd.as_str(), l.user.as_deref()),
            ("/srv", Some("1000:1000"))
        );
        let cmd_only: RunConfig = serde_json::from_str(r#"{"Cmd":["sh"]}"#).unwrap();
        let l = launch(&cmd_only).unwrap();
        assert_eq!((l.argv[0].as_str(), l.cwd.as_str()), ("sh", "/"));
        assert_eq!(l.env, [("PATH".into(), DEFAULT_PATH.into())]);
        assert_eq!(launch(&RunConfig::default()), None);
    }
}
