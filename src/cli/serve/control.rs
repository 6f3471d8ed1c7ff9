//! `fvd serve`'s control socket options (flattened into `ServeArgs`).

use super::parse_mode;
use crate::server::qmp::ControlConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// QMP control socket (unix) to listen on: query and steer the running server with
    /// `fvd ctl`, socat, qmp-shell or the qemu.qmp Python package (README.md, "Operating").
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Permissions of the control socket file, in octal.
    #[arg(long, default_value = "0600", value_parser = parse_mode, value_name = "MODE")]
    pub control_mode: u32,
}

impl ControlArgs {
    /// The control socket to open, if any.
    pub fn config(&self) -> Option<ControlConfig> {
        self.control.as_ref().map(|path| ControlConfig {
            path: path.clone(),
            mode: self.control_mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        c: ControlArgs,
    }

    #[test]
    fn control_socket_defaults_to_0600_and_takes_octal_modes() {
        let t = T::try_parse_from(["t", "--control", "/run/c.sock"]).unwrap();
        assert_eq!(
            t.c.config(),
            Some(ControlConfig {
                path: "/run/c.sock".into(),
                mode: 0o600
            })
        );
        let t = T::try_parse_from(["t", "--control", "c", "--control-mode", "0660"]).unwrap();
        assert_eq!(t.c.config().unwrap().mode, 0o660);
        assert!(T::try_parse_from(["t", "--control-mode", "999"]).is_err());
        assert_eq!(T::try_parse_from(["t"]).unwrap().c.config(), None);
    }
}
