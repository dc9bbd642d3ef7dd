// File: tests/support/postgres.cc
#include "tests/support/postgres.h"

#include <libpq-fe.h>
#include <pwd.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>


namespace fpxint::testing {
namespace {

std::string PgBin() {
  const char* b = std::getenv("FPXINT_PG_BIN");
  return b != nullptr && *b != '\0' ? b : "/usr/lib/postgresql/15/bin";
}

// Runs argv (as `postgres` when we are root); its exit code, its output into *out.
int Run(std::vector<std::string> argv, std::string* out) {
  if (geteuid() == 0) argv.insert(argv.begin(), {"/usr/sbin/runuser", "-u", "postgres", "--"});
  std::string cmd;
  for (const std::string& a : argv) cmd += "'" + a + "' ";
  cmd += "2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  const int rc = pclose(p);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

std::unique_ptr<TempPostgres> TempPostgres::Start(std::string* error) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "fpxint-pg-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    *error = "mkdtemp failed";
    return nullptr;
  }
  std::unique_ptr<TempPostgres> pg(new TempPostgres(tmpl));
  if (geteuid() == 0) {
    const passwd* pw = getpwnam("postgres");
    if (pw == nullptr || chown(tmpl.c_str(), pw->pw_uid, pw->pw_gid) != 0) {
      *error = "running as root needs the `postgres` user (Debian package postgresql-15)";
      return nullptr;
    }
  }
  std::string out;
  if (Run({PgBin() + "/initdb", "-D", tmpl + "/data", "-U", "postgres", "-A", "trust",
           "--no-sync", "-E", "UTF8"},
          &out) != 0) {
    *error = "initdb failed: " + out;
    return nullptr;
  }
  // Unix socket only, in the scratch directory; no durability needed for a test database.
  const std::string opts = "-k " + tmpl + " -c listen_addresses= -c fsync=off "
                           "-c synchronous_commit=off -c full_page_writes=off";
  if (Run({PgBin() + "/pg_ctl", "-D", tmpl + "/data", "-l", tmpl + "/server.log", "-w", "-t",
           "60", "-o", opts, "start"},
          &out) != 0) {
    std::ifstream log(tmpl + "/server.log");
    std::stringstream ss;
    ss << log.rdbuf();
    *error = "pg_ctl start failed: " + out + ss.str();
    return nullptr;
  }
  return pg;
}

TempPostgres::~TempPostgres() {
  std::string out;
  if (std::filesystem::exists(dir_ + "/data/postmaster.pid")) {
    Run({PgBin() + "/pg_ctl", "-D", dir_ + "/data", "-m", "immediate", "-w", "stop"}, &out);
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string TempPostgres::Url(const std::string& db) const {
  return "postgresql:///" + db + "?host=" + dir_ + "&user=postgres";
}

std::string TempPostgres::NewDatabase(std::string* error) {
  const std::string name = "t" + std::to_string(++next_db_);
  PGconn* c = PQconnectdb(Url().c_str());
  std::string err;
  if (PQstatus(c) != CONNECTION_OK) {
    err = PQerrorMessage(c);
  } else {
    PGresult* r = PQexec(c, ("CREATE DATABASE " + name).c_str());
    if (PQresultStatus(r) != PGRES_COMMAND_OK) err = PQresultErrorMessage(r);
    PQclear(r);
  }
  PQfinish(c);
  if (!err.empty()) {
    err = "CREATE DATABASE " + name + ": " + err;
    if (error != nullptr) {
      *error = err;
    } else {
      std::fprintf(stderr, "%s\n", err.c_str());
    }
    return "";
  }
  return Url(name);
}

}  // namespace fpxint::testing
