//! `ado-sim`: runs the Azure DevOps simulator for operators trying their sync rules. Parses
//! flags and calls the library; nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ado_sim::{Profile, Sim, SimOptions};
use clap::Parser;

/// An in-memory Azure DevOps work item tracking server (Services or Server profiles), with a
/// control API under /_sim/ (projects, faults, hooks, counters, items).
#[derive(Parser, Debug)]
#[command(name = "ado-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090", env = "ADO_SIM_LISTEN")]
    listen: SocketAddr,
    /// Version profile: services (7.1), server-2022 (7.0), server-2020 (6.0), server-2019 (5.0).
    #[arg(long, default_value = "services", env = "ADO_SIM_PROFILE")]
    profile: Profile,
    /// File holding the PAT to accept (first line); a random PAT is printed when absent.
    #[arg(long, env = "ADO_SIM_PAT_FILE")]
    pat_file: Option<PathBuf>,
    /// Project to create at start (repeatable).
    #[arg(long = "project")]
    projects: Vec<String>,
    /// Collection (or organisation) name in URLs; defaults to the profile's.
    #[arg(long)]
    collection: Option<String>,
    /// Serve HTTPS with a fresh test CA, written to this file as PEM.
    #[arg(long)]
    tls_ca_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let pat = match &args.pat_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) if !s.trim().is_empty() => Some(s.lines().next().unwrap_or("").trim().to_string()),
            Ok(_) => {
                eprintln!("error: the PAT file {} is empty", p.display());
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: reading the PAT file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let printed_pat = pat.is_none();
    let opts = SimOptions {
        profile: args.profile,
        tls: args.tls_ca_out.is_some(),
        collection: args.collection,
        projects: args.projects,
        pat,
        listen: args.listen,
        ..SimOptions::default()
    };
    let sim = match Sim::start(opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let (Some(path), Some(pem)) = (&args.tls_ca_out, &sim.ca_pem) {
        if let Err(e) = std::fs::write(path, pem) {
            eprintln!("error: writing the CA to {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    println!("ado-sim {} listening: {}", args.profile, sim.url);
    if printed_pat {
        println!("PAT: {}", sim.pat);
    }
    let _ = tokio::signal::ctrl_c().await;
    sim.shutdown().await;
    ExitCode::SUCCESS
}
