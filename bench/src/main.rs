//! sni-load: a load generator for benchmarking sni_guard. It opens TLS connections to a server
//! on loopback, each with a chosen SNI, and reports how the server answered and how fast, as one
//! JSON object on stdout. Every run is bounded by --duration (and optionally --max).

mod cli;
mod full;
mod hello;
mod hello_client;
mod names;
mod net;
mod outcome;
mod rng;
mod run;
mod schedule;
mod stats;

use std::process::ExitCode;

use rustls_pki_types::ServerName;

use crate::cli::{Args, Command, Mode};
use crate::names::Names;
use crate::rng::Rng;
use crate::run::{Plan, Work};

/// Bad arguments, including names that cannot be sent.
const EXIT_USAGE: u8 = 2;
/// The run could not be set up or carried out.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let args = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e),
    };
    let names = match Names::load(&args.names) {
        Ok(names) => names,
        Err(e) => return usage_error(&e),
    };
    let plan = match plan(&args, names) {
        Ok(plan) => plan,
        Err(code) => return code,
    };
    let (mut tally, elapsed) = match run::run(&plan) {
        Ok(result) => result,
        Err(e) => {
            eprintln!("sni-load: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    for (kind, e) in &tally.errors {
        eprintln!("sni-load: {} {kind} error(s), first: {}", e.count, e.example);
    }
    println!("{}", stats::report_json(args.mode.as_str(), &mut tally, elapsed));
    ExitCode::SUCCESS
}

fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("sni-load: {e}\n(sni-load --help shows the usage)");
    ExitCode::from(EXIT_USAGE)
}

/// Prepares everything that is the same for all attempts: TLS configuration, the rustls form of
/// each listed name, or the ClientHello of each.
fn plan(args: &Args, names: Names) -> Result<Plan, ExitCode> {
    let listed: &[String] = match &names {
        Names::List(list) => list,
        Names::Random { .. } => &[],
    };
    let work = match args.mode {
        Mode::Full => {
            let config = full::client_config(args.tls12).map_err(|e| {
                eprintln!("sni-load: tls configuration: {e}");
                ExitCode::from(EXIT_FAILURE)
            })?;
            let listed = listed
                .iter()
                .map(|name| ServerName::try_from(name.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| usage_error(&e))?;
            let target = full::Target {
                config,
                addr: args.addr,
                source: args.source,
                request: args.request,
            };
            Work::Full { target, listed }
        }
        Mode::Hello => {
            let mut rng = Rng::from_os(u64::MAX);
            let listed = listed
                .iter()
                .map(|name| hello::client_hello(name, &mut rng))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| usage_error(&e))?;
            Work::Hello { addr: args.addr, source: args.source, listed }
        }
    };
    Ok(Plan {
        work,
        names,
        concurrency: args.concurrency,
        timeout: args.timeout,
        duration: args.duration,
        max: args.max,
        rate: args.rate,
    })
}
