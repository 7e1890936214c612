//! `parallax serve`'s configuration file: `--config FILE`, or
//! [`DEFAULT_CONFIG`] when it exists.
//!
//! A TOML table whose keys are `serve`'s long flags (and the global ones:
//! `store`, `control`, `host-id`), with `-` or `_` alike, and whose values
//! are what the flag takes: a string, a number, or `true`/`false` for a
//! switch. A flag on the command line (or its environment variable) wins
//! over the file. The file is turned into flags appended to the command
//! line, so it is checked exactly as the command line is; a key that is no
//! flag is an error, not ignored.

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory};
use std::ffi::OsString;
use std::path::PathBuf;

/// Read by `serve` when there is no `--config` and it exists.
pub const DEFAULT_CONFIG: &str = "/etc/parallax/parallax.toml";

/// `args` with the settings of `serve`'s configuration file appended as
/// flags (those not given on the command line). Anything but `serve`, or
/// a command line clap refuses, comes back unchanged.
pub fn with_config_file<C: CommandFactory>(mut args: Vec<OsString>) -> Result<Vec<OsString>> {
    let command = C::command();
    let Ok(matches) = command.clone().try_get_matches_from(&args) else {
        return Ok(args);
    };
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(args);
    };
    let (path, named) = match serve.get_one::<PathBuf>("config") {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => return Ok(args),
        Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
    };
    let serve_command = command
        .find_subcommand("serve")
        .ok_or_else(|| anyhow!("no serve command"))?;
    let flags = flags_from(&text, serve_command, &command, serve)
        .with_context(|| format!("in {}", path.display()))?;
    args.extend(flags.into_iter().map(OsString::from));
    Ok(args)
}

/// The flags `text` sets that `given` (the command line's matches of
/// `serve`) does not.
fn flags_from(
    text: &str,
    serve: &clap::Command,
    top: &clap::Command,
    given: &ArgMatches,
) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        if long == "config" {
            bail!("'{key}': a configuration file cannot name another");
        }
        let arg = serve
            .get_arguments()
            .chain(top.get_arguments())
            .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
            .ok_or_else(|| {
                anyhow!(
                    "'{key}' is not a setting (settings are `parallax serve --help`'s long flags)"
                )
            })?;
        let id = arg.get_id().as_str();
        if matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        match value {
            toml::Value::Boolean(on) if switch => {
                if on {
                    flags.push(format!("--{long}"));
                }
            }
            _ if switch => bail!("'{key}' is a switch: true or false"),
            toml::Value::String(s) => flags.push(format!("--{long}={s}")),
            toml::Value::Integer(n) => flags.push(format!("--{long}={n}")),
            other => bail!(
                "'{key}': expected a string or a number, not a {}",
                other.type_str()
            ),
        }
    }
    Ok(flags)
}
