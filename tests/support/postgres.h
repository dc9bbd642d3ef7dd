// File: tests/support/postgres.h
//
// A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a scratch directory, listening on a Unix
// socket in that directory only (no TCP port), stopped and removed by the destructor. It runs
// Debian's postgresql-15 binaries (/usr/lib/postgresql/15/bin, or $FPXINT_PG_BIN); as root it
// runs them as the `postgres` user, since PostgreSQL refuses to run as root.
//
// Example:
//   auto pg = TempPostgres::Start();          // ~2 s
//   std::string url = pg->NewDatabase();     // postgresql:///t1?host=/tmp/...&user=postgres
#ifndef FPXINT_TESTS_SUPPORT_POSTGRES_H_
#define FPXINT_TESTS_SUPPORT_POSTGRES_H_

#include <memory>
#include <string>

namespace fpxint::testing {

class TempPostgres {
 public:
  // nullptr with *error set when the server cannot be started.
  static std::unique_ptr<TempPostgres> Start(std::string* error);
  ~TempPostgres();
  TempPostgres(const TempPostgres&) = delete;
  TempPostgres& operator=(const TempPostgres&) = delete;

  // A libpq URI of database `db` on this server.
  std::string Url(const std::string& db = "postgres") const;
  // Creates a fresh empty database and returns its URI; "" on error, with the reason in *error
  // (or on stderr when error is null).
  std::string NewDatabase(std::string* error = nullptr);
  // The socket directory (libpq's host).
  const std::string& socket_dir() const { return dir_; }

 private:
  explicit TempPostgres(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
  int next_db_ = 0;
};

}  // namespace fpxint::testing

#endif  // FPXINT_TESTS_SUPPORT_POSTGRES_H_
