//! Dead letters go round again: once by themselves after a delay, and in
//! bulk from the operator command.

use uploadhook::{
    domain::WebhookId,
    proto::{self, Status},
    store::{RedriveFilter, RedriveSource},
};

use crate::{
    backend_tests,
    flow::{confirm, create_and_upload},
    helpers::{Receiver, TestApp, TestDb, authed, wait_for},
};

backend_tests!(
    a_dead_letter_is_redriven_once_by_itself,
    bulk_redrive_takes_what_the_filter_says,
);

/// Reconciles (and so auto-redrives) every 200 ms; dead letters wait 1 s.
const AUTO: &str =
    "[delivery]\nauto_redrive_after = \"1s\"\n[queue]\nreconcile_every = \"200ms\"\n";

async fn dead_letter(app: &TestApp, rx: &Receiver) -> String {
    rx.always(Some(500));
    let created = create_and_upload(app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(app, &id, "").await.unwrap();
    wait_for(app, &app.key_a, &id, Status::DeadLetter).await;
    id
}

async fn a_dead_letter_is_redriven_once_by_itself(db: &TestDb) {
    let mut app = TestApp::start(db, AUTO).await;
    let rx = Receiver::start().await;
    // Three failures dead-letter it, then the receiver is fixed; nobody
    // calls Redeliver. (The plan, not a switch flipped once DEAD_LETTER
    // is seen: the redrive comes 1 s later, and a loaded machine may see
    // the status later than that, or not at all.)
    rx.answer(&[500, 500, 500]);
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::Completed).await;
    assert_eq!(w.attempt_count, 4, "3 failed + 1 after the redrive");
    let tenant = app
        .store()
        .authenticate(&app.key_a, chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let wid = WebhookId::parse(&id).unwrap();
    let dead = app.store().dead_letters(&tenant, &wid).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].redriven_by.as_deref(), Some("auto"));

    // Broken again and redelivered by hand: dead-lettered a second time,
    // and this time it stays there.
    rx.always(Some(500));
    app.client()
        .await
        .redeliver(authed(
            &app.key_a,
            proto::RedeliverRequest {
                webhook_id: id.clone(),
            },
        ))
        .await
        .unwrap();
    wait_for(&app, &app.key_a, &id, Status::DeadLetter).await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let due = app.store().auto_redrive_due(later, 100).await.unwrap();
    assert!(
        due.iter().all(|w| w.id != id),
        "a webhook is redriven automatically only once"
    );
    // Several reconciler rounds past the delay: still dead-lettered.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let dead = app.store().dead_letters(&tenant, &wid).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead[1].redriven_at.is_none(), "{dead:?}");
    assert_eq!(
        crate::helpers::get(&app, &app.key_a, &id).await.status(),
        Status::DeadLetter
    );
    app.stop().await;
}

async fn bulk_redrive_takes_what_the_filter_says(db: &TestDb) {
    // No automatic redrive here: only the command moves them.
    let mut app = TestApp::start(
        db,
        "[delivery]\nauto_redrive_after = \"off\"\ntimeout = \"3s\"\n[queue]\nreconcile_every = \"200ms\"\nvisibility_timeout = \"4s\"\n",
    )
    .await;
    let rx = Receiver::start().await;
    let a1 = dead_letter(&app, &rx).await;
    let a2 = dead_letter(&app, &rx).await;
    let tenant_a = app
        .store()
        .tenant_by_name("tenant-a")
        .await
        .unwrap()
        .unwrap();
    let filter = |tenant, since| RedriveFilter {
        tenant,
        statuses: vec![uploadhook::domain::Status::DeadLetter],
        since,
        until: None,
    };

    // Another tenant's filter matches none of them.
    let tenant_b = app
        .store()
        .tenant_by_name("tenant-b")
        .await
        .unwrap()
        .unwrap();
    let r = uploadhook::ops::bulk_redrive(&app.config, &filter(Some(tenant_b), None), None, false)
        .await
        .unwrap();
    assert_eq!((r.matched, r.redriven), (0, 0));
    // A time range after they were dead-lettered matches none either.
    let future = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let r = uploadhook::ops::bulk_redrive(&app.config, &filter(None, future), None, false)
        .await
        .unwrap();
    assert_eq!(r.matched, 0);
    // A dry run counts and changes nothing.
    let r = uploadhook::ops::bulk_redrive(
        &app.config,
        &filter(Some(tenant_a.clone()), None),
        None,
        true,
    )
    .await
    .unwrap();
    assert_eq!((r.matched, r.redriven), (2, 0));

    // With the receiver fixed, a limit of one redrives one.
    rx.always(None);
    let r = uploadhook::ops::bulk_redrive(
        &app.config,
        &filter(Some(tenant_a.clone()), None),
        Some(1),
        false,
    )
    .await
    .unwrap();
    assert_eq!((r.matched, r.redriven, r.moved_on), (1, 1, 0));
    let r = uploadhook::ops::bulk_redrive(
        &app.config,
        &filter(Some(tenant_a.clone()), None),
        None,
        false,
    )
    .await
    .unwrap();
    assert_eq!((r.matched, r.redriven), (1, 1));
    // Both complete: queued by the command on Redis, put back by the
    // reconciler on the in-process queue.
    for id in [&a1, &a2] {
        let w = wait_for(&app, &app.key_a, id, Status::Completed).await;
        assert_eq!(w.attempt_count, 4);
        let wid = WebhookId::parse(id).unwrap();
        let dead = app.store().dead_letters(&tenant_a, &wid).await.unwrap();
        assert_eq!(
            dead[0].redriven_by.as_deref(),
            Some(RedriveSource::Cli.as_str())
        );
    }
    app.stop().await;
}

/// The command line itself: bad flags are named; a dry run on an empty
/// database reports nothing to do.
#[test]
fn redrive_command_names_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_uploadhook"))
            .args(args)
            .env(
                "UPLOADHOOK_DATABASE__URL",
                format!("sqlite://{}/db.sqlite?mode=rwc", dir.path().display()),
            )
            .env("UPLOADHOOK_EMBEDDED_S3__MODE", "off")
            .env_remove("UPLOADHOOK_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["redrive", "--status", "pending"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--status"), "{err}");
    let out = run(&["redrive", "--since", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    let out = run(&["redrive", "--tenant", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tenant named"));

    let out = run(&[
        "redrive",
        "--dry-run",
        "--since",
        "24h",
        "--status",
        "dead_letter,failed",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("matched:   0"), "{stdout}");
}
