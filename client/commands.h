// File: client/commands.h
//
// The service commands of `fpxint` (README.md "CLI reference"). Each Add* function registers its
// subcommands on `app`; after parsing, the chosen command runs from its callback and stores its
// exit code (client/exit_codes.h) in *exit_code.
#ifndef FPXINT_CLIENT_COMMANDS_H_
#define FPXINT_CLIENT_COMMANDS_H_

#include "CLI/CLI.hpp"
#include "client/options.h"

namespace fpxint::client {

// Adds subcommand `name`: the first line of `text` is the one-line description shown in the parent's
// list; the rest (details, examples) is the footer of the command's own --help.
inline CLI::App* AddCommand(CLI::App& parent, const std::string& name, const std::string& text) {
  const size_t nl = text.find('\n');
  CLI::App* c = parent.add_subcommand(name, text.substr(0, nl));
  if (nl != std::string::npos) c->footer(text.substr(nl + 1));
  return c;
}

// upload, download
void AddTransferCommands(CLI::App& app, const GlobalOptions& g, int* exit_code);
// quantize, jobs list|get|watch|cancel
void AddJobCommands(CLI::App& app, const GlobalOptions& g, int* exit_code);
// models list|get|load|unload|delete, infer, health
void AddServingCommands(CLI::App& app, const GlobalOptions& g, int* exit_code);
// completion bash
void AddCompletionCommand(CLI::App& app, int* exit_code);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_COMMANDS_H_
