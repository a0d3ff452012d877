//! `weft-control`: the control plane of the weft service mesh (tokio + tonic, built-in CA).
//!
//! This first version only prints its version and usage; the CA, join tokens, SVID issuance and
//! snapshot push arrive with the control-plane issue. The CLI shape below is the contract.

use std::process::ExitCode;

const USAGE: &str = "weft-control: the weft control plane

USAGE:
    weft-control serve --config DIR --data-dir DIR [--listen ADDR] [--admin ADDR]
    weft-control token NS/WORKLOAD --data-dir DIR [--ttl DURATION]
    weft-control mint NS/WORKLOAD --data-dir DIR --out DIR
    weft-control ca rotate --data-dir DIR
    weft-control ca retire SERIAL --data-dir DIR
    weft-control --version | --help

Not implemented yet in this build: every subcommand exits with status 2.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => {
            println!("weft-control {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("--help" | "-h" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(cmd) => {
            eprintln!("weft-control: `{cmd}` is not implemented in this build\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
