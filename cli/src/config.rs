//! The CLI's settings: flags, then environment (`EDGEFLEET_SERVER`,
//! `EDGEFLEET_TOKEN`, … both through clap), then a TOML file, then defaults.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Deserialize;

use crate::Output;

/// The config file's keys: those of the flags they stand for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub output: Option<Output>,
}

/// Where the config file is when none is named:
/// `$XDG_CONFIG_HOME/edgefleet/config.toml` (an absolute `XDG_CONFIG_HOME`
/// only, as the XDG Base Directory spec says), else
/// `$HOME/.config/edgefleet/config.toml`. None without an absolute `HOME`.
pub(crate) fn default_path(
    xdg_config_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Option<PathBuf> {
    fn absolute(dir: Option<&OsStr>) -> Option<&Path> {
        dir.map(Path::new).filter(|dir| dir.is_absolute())
    }
    let config_home = match absolute(xdg_config_home) {
        Some(dir) => dir.to_path_buf(),
        None => absolute(home)?.join(".config"),
    };
    Some(config_home.join("edgefleet").join("config.toml"))
}

/// The config file named by `--config` (an error if it cannot be read), else
/// the default one if it exists, else no settings.
pub(crate) fn load(named: Option<&Path>) -> anyhow::Result<FileConfig> {
    let path = match named {
        Some(path) => path.to_path_buf(),
        None => match default_path(
            std::env::var_os("XDG_CONFIG_HOME").as_deref(),
            std::env::var_os("HOME").as_deref(),
        ) {
            Some(path) if path.exists() => path,
            _ => return Ok(FileConfig::default()),
        },
    };
    let mut file: FileConfig = edgefleet_daemon::load_toml_config(&path)?;
    if file.token.is_some() {
        check_private(&path)?;
    }
    // A relative path in the file is relative to the file, not to wherever
    // the command happens to run.
    if let (Some(ca_cert), Some(dir)) = (&file.ca_cert, path.parent()) {
        file.ca_cert = Some(dir.join(ca_cert));
    }
    Ok(file)
}

/// Refuses a file holding a token that others than its owner may read or
/// write, as ssh refuses such a private key: the token is the fleet's admin
/// credential.
#[cfg(unix)]
fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|err| anyhow::anyhow!("cannot read config file {}: {err}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "config file {} holds a token but is accessible by group or others (mode {mode:04o}): run chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_under_the_users_config_directory() {
        let xdg = OsStr::new("/xdg");
        let home = OsStr::new("/home/u");
        assert_eq!(
            default_path(Some(xdg), Some(home)),
            Some(PathBuf::from("/xdg/edgefleet/config.toml"))
        );
        // A relative XDG_CONFIG_HOME is ignored, as the spec says.
        assert_eq!(
            default_path(Some(OsStr::new("rel")), Some(home)),
            Some(PathBuf::from("/home/u/.config/edgefleet/config.toml"))
        );
        assert_eq!(
            default_path(None, Some(home)),
            Some(PathBuf::from("/home/u/.config/edgefleet/config.toml"))
        );
        assert_eq!(default_path(None, None), None);
        assert_eq!(default_path(None, Some(OsStr::new("rel"))), None);
    }
}
