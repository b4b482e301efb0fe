//! Runs one request line against a [`ControlTarget`] and builds its response.

use serde::Serialize;
use serde_json::Value;

use super::protocol::{
    parse_request_line, BalloonInfo, Command, ErrorBody, ErrorKind, HelloResult, Response, BALLOON_PAGE_BYTES,
};
use super::target::{BalloonControl, ControlTarget, LifecycleControl, MigrationControl, PagingControl};

/// The response to one request line (newline already cut off).
pub(super) fn answer(target: &dyn ControlTarget, line: &[u8]) -> Response {
    let (id, command) = parse_request_line(line);
    let result = command.and_then(|command| run(target, command));
    match (id, result) {
        (Some(id), Ok(value)) => Response::success(id, value),
        (id, Err(error)) => Response::failure(id, error),
        // parse_request_line gives no id only with an error.
        (None, Ok(_)) => Response::failure(None, ErrorBody::new(ErrorKind::BadRequest, "the request has no id")),
    }
}

fn run(target: &dyn ControlTarget, command: Command) -> Result<Value, ErrorBody> {
    match command {
        Command::Hello => Ok(to_value(HelloResult::current())),
        Command::Status => Ok(to_value(target.status())),
        Command::BalloonGet => Ok(to_value(balloon_info(balloon(target)?))),
        Command::BalloonStats => Ok(to_value(balloon(target)?.stats())),
        Command::PagingStats => Ok(paging(target)?.stats()),
        Command::Pause => lifecycle(target)?.pause().map_err(lifecycle_error),
        Command::Resume => lifecycle(target)?.resume().map_err(lifecycle_error),
        Command::SnapshotCreate(request) => lifecycle(target)?.snapshot(&request).map_err(lifecycle_error),
        Command::Migrate(request) => migration(target)?.migrate(&request).map_err(migration_error),
        Command::MigrateStatus => migration(target)?.migrate_status().map_err(migration_error),
        Command::MigrateCancel => migration(target)?.migrate_cancel().map_err(migration_error),
        Command::PagingCheck => {
            paging(target)?.check_coherence().map_err(|e| ErrorBody::new(ErrorKind::PagingError, e))
        }
        Command::BalloonSet { target_bytes } => {
            let balloon = balloon(target)?;
            let memory_bytes = target.status().memory_bytes;
            if let Err(reason) = crate::config::check_balloon_target(target_bytes, memory_bytes) {
                return Err(ErrorBody::new(
                    ErrorKind::BadArgs,
                    format!("target {target_bytes} bytes: {reason} (guest RAM is {memory_bytes} bytes)"),
                ));
            }
            balloon
                .set_target_pages(target_bytes / BALLOON_PAGE_BYTES)
                .map_err(|e| ErrorBody::new(ErrorKind::BalloonError, format!("the balloon refused the target: {e}")))?;
            Ok(to_value(balloon_info(balloon)))
        }
    }
}

fn balloon(target: &dyn ControlTarget) -> Result<&dyn BalloonControl, ErrorBody> {
    target.balloon().ok_or_else(|| {
        ErrorBody::new(
            ErrorKind::NoBalloon,
            "this VM has no balloon device; start it with a balloon (faultline run --balloon) to steer one",
        )
    })
}

fn lifecycle(target: &dyn ControlTarget) -> Result<&dyn LifecycleControl, ErrorBody> {
    target.lifecycle().ok_or_else(|| ErrorBody::new(ErrorKind::LifecycleError, "this VM cannot be paused or saved"))
}

fn migration(target: &dyn ControlTarget) -> Result<&dyn MigrationControl, ErrorBody> {
    target.migration().ok_or_else(|| ErrorBody::new(ErrorKind::MigrationError, "this VM cannot migrate"))
}

fn migration_error(message: String) -> ErrorBody {
    ErrorBody::new(ErrorKind::MigrationError, message)
}

fn lifecycle_error(message: String) -> ErrorBody {
    ErrorBody::new(ErrorKind::LifecycleError, message)
}

fn paging(target: &dyn ControlTarget) -> Result<&dyn PagingControl, ErrorBody> {
    target.paging().ok_or_else(|| ErrorBody::new(ErrorKind::NoPaging, "this VM does not expose its paging state"))
}

fn balloon_info(balloon: &dyn BalloonControl) -> BalloonInfo {
    let sizes = balloon.sizes();
    BalloonInfo {
        target_bytes: sizes.target_pages.saturating_mul(BALLOON_PAGE_BYTES),
        target_pages: sizes.target_pages,
        actual_bytes: sizes.actual_pages.saturating_mul(BALLOON_PAGE_BYTES),
        actual_pages: sizes.actual_pages,
        host_freed_bytes: sizes.host_freed_bytes,
        partial_huge_pages: sizes.partial_huge_pages,
        stats: balloon.stats(),
    }
}

fn to_value<T: Serialize>(value: T) -> Value {
    serde_json::to_value(value).expect("protocol results always serialize")
}
