//! `relay sync …`: the sync rules, the initial (bulk) sync, one item now, and sync errors.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{admin_call, parse};
use crate::admin::Request;
use crate::config::Settings;
use crate::daemon::{self, Role};
use crate::error::{Kind, OpError, OpResult};
use crate::status::{now_ms, when};
use crate::sync::engine::BulkReport;
use crate::sync::ops::SyncRequest;
use crate::sync::state::{RulesRecord, SyncError, SyncWarning};

/// `relay sync …`.
#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Show, set or try a connection's sync rules (both scripts in one text).
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Send every item the connection's trigger matches that was never synced (the initial sync).
    Bulk {
        /// Connection name.
        connection: String,
        /// Only count what would be sent.
        #[arg(long)]
        dry_run: bool,
    },
    /// Send one work item now, changed or not.
    Item {
        /// Connection name.
        connection: String,
        /// Local work item id.
        id: u64,
    },
    /// List items that could not be synced: item, side, message, time.
    Errors {
        /// One connection (default: all).
        connection: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List items that synced without a field (a person unknown on this side): item, field,
    /// message. `relay sync errors` lists them too, after the errors.
    Warnings {
        /// One connection (default: all).
        connection: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Try an item with a sync error again (after fixing the rules or the item).
    Retry(ItemArgs),
    /// Drop an item's sync error and the replicas that waited behind it.
    Resolve(ItemArgs),
}

/// One item of a connection.
#[derive(Debug, Args)]
pub struct ItemArgs {
    /// Connection name.
    pub connection: String,
    /// The item as `relay sync errors` lists it.
    pub item: String,
    /// Which side's error (needed only when the same id failed both ways).
    #[arg(long, value_enum)]
    pub side: Option<crate::sync::state::Side>,
}

/// `relay sync rules …`.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Print the rules (and the trigger).
    Show {
        /// Connection name.
        connection: String,
    },
    /// Compile and store rules from FILE ("-" for stdin); a syntax error is refused with its
    /// line and column, and nothing is stored.
    Set {
        /// Connection name.
        connection: String,
        /// Rules file.
        file: PathBuf,
        /// WIQL condition selecting the items to send, e.g. "[System.WorkItemType] = 'Bug'".
        #[arg(long, conflicts_with = "all_items")]
        trigger: Option<String>,
        /// Send every item of the project (drop the trigger).
        #[arg(long)]
        all_items: bool,
    },
    /// Run the outgoing script on a live item and/or the incoming script on a replica file;
    /// print the replica and the JSON Patch that would be written. Writes nothing.
    Test {
        /// Connection name.
        connection: String,
        /// A local work item id for the outgoing script.
        #[arg(long)]
        item: Option<u64>,
        /// A replica document (JSON) for the incoming script.
        #[arg(long)]
        replica: Option<PathBuf>,
        /// Rules to try instead of the stored ones.
        #[arg(long)]
        rules: Option<PathBuf>,
    },
}

fn read(path: &PathBuf) -> OpResult<String> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    text.map_err(|e| OpError::new(Kind::Invalid, format!("cannot read {}: {e}", path.display())))
}

async fn call(settings: &Settings, request: SyncRequest) -> OpResult<serde_json::Value> {
    let role = daemon::recorded_role(&settings.data_dir).unwrap_or(Role::Agent);
    admin_call(settings, role, Request::Sync { request }).await
}

/// Runs a `relay sync` command.
pub async fn run(settings: &Settings, command: SyncCommand) -> OpResult<()> {
    match command {
        SyncCommand::Rules(RulesCommand::Show { connection }) => {
            let r: RulesRecord = parse(call(settings, SyncRequest::RulesShow { connection }).await?)?;
            if let Some(t) = &r.trigger {
                eprintln!("trigger: {t}");
            }
            print!("{}", r.source);
        }
        SyncCommand::Rules(RulesCommand::Set {
            connection,
            file,
            trigger,
            all_items,
        }) => {
            let source = read(&file)?;
            let r: RulesRecord = parse(
                call(
                    settings,
                    SyncRequest::RulesSet {
                        connection: connection.clone(),
                        source,
                        trigger,
                        clear_trigger: all_items,
                    },
                )
                .await?,
            )?;
            println!(
                "rules of {connection} stored ({} lines); trigger: {}",
                r.source.lines().count(),
                r.trigger.as_deref().unwrap_or("every item of the project")
            );
        }
        SyncCommand::Rules(RulesCommand::Test {
            connection,
            item,
            replica,
            rules,
        }) => {
            let request = SyncRequest::RulesTest {
                connection,
                item,
                replica: replica.as_ref().map(read).transpose()?,
                source: rules.as_ref().map(read).transpose()?,
            };
            let out = call(settings, request).await?;
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        SyncCommand::Bulk { connection, dry_run } => {
            let r: BulkReport = parse(call(settings, SyncRequest::Bulk { connection, dry_run }).await?)?;
            let verb = if dry_run { "would send" } else { "sent" };
            println!(
                "{} items match; {} already synced; {verb} {}; {} failed (relay sync errors)",
                r.matched, r.already, r.sent, r.failed
            );
        }
        SyncCommand::Item { connection, id } => {
            let said: String = parse(call(settings, SyncRequest::Item { connection, id }).await?)?;
            println!("{said}");
        }
        SyncCommand::Errors { connection, json } => {
            let list: Vec<SyncError> = parse(
                call(
                    settings,
                    SyncRequest::Errors {
                        connection: connection.clone(),
                    },
                )
                .await?,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
                return Ok(());
            }
            if list.is_empty() {
                println!("no sync errors");
            } else {
                let now = now_ms();
                for e in &list {
                    println!(
                        "{}  {} item {}  ({}, {} attempts, {} waiting): {}",
                        e.connection,
                        e.side,
                        e.item,
                        when(e.at_ms, now),
                        e.attempts,
                        e.parked.len().saturating_sub(1),
                        e.message
                    );
                }
            }
            let warnings: Vec<SyncWarning> = parse(call(settings, SyncRequest::Warnings { connection }).await?)?;
            if !warnings.is_empty() {
                println!("synced without a field ({}):", warnings.len());
                print_warnings(&warnings);
            }
        }
        SyncCommand::Warnings { connection, json } => {
            let list: Vec<SyncWarning> = parse(call(settings, SyncRequest::Warnings { connection }).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else if list.is_empty() {
                println!("no sync warnings");
            } else {
                print_warnings(&list);
            }
        }
        SyncCommand::Retry(a) => {
            let list: Vec<SyncError> = parse(
                call(
                    settings,
                    SyncRequest::Retry {
                        connection: a.connection,
                        item: a.item.clone(),
                        side: a.side,
                    },
                )
                .await?,
            )?;
            println!("item {} queued for retry ({} error(s))", a.item, list.len());
        }
        SyncCommand::Resolve(a) => {
            let list: Vec<SyncError> = parse(
                call(
                    settings,
                    SyncRequest::Resolve {
                        connection: a.connection,
                        item: a.item.clone(),
                        side: a.side,
                    },
                )
                .await?,
            )?;
            println!("item {}: {} error(s) dropped", a.item, list.len());
        }
    }
    Ok(())
}

fn print_warnings(list: &[SyncWarning]) {
    let now = now_ms();
    for w in list {
        println!(
            "{}  incoming item {}  {} ({}): {}",
            w.connection,
            w.item,
            w.field,
            when(w.at_ms, now),
            w.message
        );
    }
}
