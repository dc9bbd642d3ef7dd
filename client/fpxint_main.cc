// `fpxint`: the command-line client of the fpxint quantization service, plus the offline `expand`.
// It links the generated gRPC stubs and the core library, never LibTorch, so it starts in
// milliseconds. Exit codes: client/exit_codes.h (documented in README.md).
#include <cstdio>
#include <cstdlib>

#include "CLI/CLI.hpp"
#include "client/commands.h"
#include "client/exit_codes.h"
#include "client/expand_command.h"
#include "client/rpc.h"

int main(int argc, char** argv) {
  using namespace fpxint::client;
  CLI::App app(
      "fpxint — quantize neural networks with the FP=xINT low-bit series expansion.\n"
      "A weight tensor W becomes a sum of K low-bit terms s_k*(C_k - z_k); the error shrinks\n"
      "geometrically with every term, with no calibration data and no fine-tuning.\n\n"
      "Service commands talk to fpxint-server (--server, default 127.0.0.1:8001):\n"
      "  fpxint upload model.pt --name m --input x:FP32:1,3,32,32\n"
      "  fpxint quantize --model m --granularity layer --bits 4 --terms 2 --deploy-as m4 --wait\n"
      "  fpxint infer m4 -i x.npy\n"
      "`fpxint expand` works offline on a safetensors file.\n\n"
      "Exit codes: 0 ok, 2 usage, 3 bad input, 4 server/IO error, 5 job failed (or quality gate),\n"
      "6 cancelled, 7 authentication/permission.",
      "fpxint");
  app.set_version_flag("--version", "fpxint 0.1.0");
  app.require_subcommand(1);
  GlobalOptions global;
  app.add_flag("--json", global.json, "print one machine-readable JSON document on stdout")
      ->configurable(false);
  app.add_flag("-q,--quiet", global.quiet, "no progress and no summary (errors still go to stderr)");
  app.add_option("--server", global.server, "fpxint-server gRPC address HOST:PORT")
      ->envname("FPXINT_SERVER")
      ->capture_default_str();
  app.add_option("--token", global.token, "bearer token for a server with --token-file")
      ->envname("FPXINT_TOKEN");
  app.add_option("--tls-ca", global.tls_ca, "connect with TLS, trusting these PEM roots")
      ->envname("FPXINT_TLS_CA");
  app.add_option("--tls-cert", global.tls_cert, "client certificate (PEM) for mutual TLS")
      ->envname("FPXINT_CLIENT_TLS_CERT");
  app.add_option("--tls-key", global.tls_key, "client private key (PEM) for mutual TLS")
      ->envname("FPXINT_CLIENT_TLS_KEY");
  app.add_option("--timeout", global.timeout_seconds,
                 "seconds to wait for each request (transfers and --wait are not limited; 0 = none)")
      ->envname("FPXINT_TIMEOUT")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.fallthrough();
  int exit_code = kExitOk;
  AddTransferCommands(app, global, &exit_code);
  AddJobCommands(app, global, &exit_code);
  AddServingCommands(app, global, &exit_code);
  AddExpandCommand(app, global, &exit_code);
  AddCompletionCommand(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    // Pipelines asked for JSON get a document on stdout for usage errors too.
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]) == "--json") {
        ReportErrorJsonOnly(e.what(), kExitUsage);
        break;
      }
    }
    return kExitUsage;
  }
  return exit_code;
}
