//! The test ClickHouse: the real engine (chdb) behind `tests/clickhouse/front.py`, one
//! server per test on its own data dir, so a test can stop and restart it on the same port
//! (an outage) without disturbing the others. `cargo xtask test` installs it and says where
//! (`CREDWATCH_TEST_CHDB_PYTHON`). `CREDWATCH_TEST_CLICKHOUSE_URL` points the tests at a real
//! server instead; tests that need to stop the server or inject faults refuse it (`cargo xtask test` leaves
//! them out then, and says so).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::unique;

pub struct TestClickHouse {
    child: Option<Child>,
    python: Option<PathBuf>,
    data: Option<tempfile::TempDir>,
    pub port: u16,
    pub url: String,
    /// A database of its own, so tests sharing a real server do not see each other's rows.
    pub database: String,
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("CREDWATCH_TEST_CHDB_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/share/credwatch/chdb-venv/bin/python"))
        })?;
    p.exists().then_some(p)
}

fn front() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse/front.py"))
}

impl TestClickHouse {
    /// The project's test server (or the real one `CREDWATCH_TEST_CLICKHOUSE_URL` names).
    /// Missing, it fails the test: `cargo xtask test` installs it.
    pub fn start() -> TestClickHouse {
        let database = unique("cwtest").replace('-', "_");
        if let Ok(url) = std::env::var("CREDWATCH_TEST_CLICKHOUSE_URL") {
            return TestClickHouse {
                child: None,
                python: None,
                data: None,
                port: 0,
                url,
                database,
            };
        }
        let python = python().unwrap_or_else(|| {
            panic!("no test ClickHouse installed (`cargo xtask test` installs it)")
        });
        let mut ch = TestClickHouse {
            child: None,
            python: Some(python),
            data: Some(tempfile::tempdir().expect("tempdir")),
            port: 0,
            url: String::new(),
            database,
        };
        ch.launch();
        ch
    }

    /// The project's own server, for tests that stop it or make it misbehave (`what`); a
    /// real server cannot be used for those (`cargo xtask test` leaves them out then).
    pub fn start_local(what: &str) -> TestClickHouse {
        assert!(
            std::env::var_os("CREDWATCH_TEST_CLICKHOUSE_URL").is_none(),
            "this test needs {what}, which a real server (CREDWATCH_TEST_CLICKHOUSE_URL) cannot give"
        );
        Self::start()
    }

    /// True for the project's own server, which can be stopped and told to misbehave.
    pub fn is_local(&self) -> bool {
        self.python.is_some()
    }

    fn launch(&mut self) {
        let (Some(py), Some(data)) = (&self.python, &self.data) else {
            return;
        };
        let mut child = Command::new(py)
            .arg(front())
            .arg("--data")
            .arg(data.path().join("chdb"))
            .arg("--port")
            .arg(self.port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the test ClickHouse");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("test ClickHouse did not start: {line:?}"))
            .to_owned();
        self.port = url.rsplit(':').next().unwrap().parse().unwrap();
        self.url = url;
        self.child = Some(child);
    }

    /// Kills the server (SIGKILL: nothing is flushed, like a crash or a network cut).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Same port, same data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.launch();
    }

    /// `[clickhouse]` for an agent writing here, with short batching so tests are quick.
    pub fn config(&self) -> String {
        format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"{}\"\nflush_interval = \"200ms\"\ntimeout = \"5s\"\n",
            self.url, self.database
        )
    }

    /// A client on the test database.
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.url)
            .with_database(&self.database)
    }

    /// Runs a query returning one value.
    pub fn scalar<T>(&self, sql: &str) -> T
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let c = self.client();
        runtime()
            .block_on(async { c.query(sql).fetch_one::<T>().await })
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let c = self.client();
        runtime()
            .block_on(async { c.query(sql).fetch_all::<T>().await })
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Fault injection on the project's own server (`POST /_test/...`).
    pub fn fault(&self, path: &str) {
        assert!(self.is_local(), "faults need the project's test server");
        ureq::post(&format!("{}/_test/{path}", self.url))
            .call()
            .unwrap_or_else(|e| panic!("fault {path}: {e}"));
    }
}

impl Drop for TestClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    credwatch::current_thread_runtime().unwrap()
}
