# Test helpers shared by the product build (tests/CMakeLists.txt) and the fuzz build
# (tests/fuzz/CMakeLists.txt, which also runs the core unit tests under ASan/UBSan).
set(FPXINT_TESTS_DIR ${PROJECT_SOURCE_DIR}/tests)
add_library(fpxint_test_support STATIC ${FPXINT_TESTS_DIR}/support/test_support.cc)
target_include_directories(fpxint_test_support PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(fpxint_test_support PUBLIC GTest::gtest fpxint_core)

# Where scripts/fetch_models.sh puts the real models; `make test` passes it in.
set(FPXINT_MODELS_DIR "" CACHE PATH "Directory of real models fetched by scripts/fetch_models.sh")

# The exact numpy test tensors behind the reference numbers of docs/ALGORITHM.md §7 (a ctest
# fixture).
set(FPXINT_REFERENCE_DIR ${CMAKE_BINARY_DIR}/testdata/reference)
add_test(NAME fixture.reference_tensors
  COMMAND /usr/bin/python3 ${FPXINT_TESTS_DIR}/reference/make_reference_tensors.py
          ${FPXINT_REFERENCE_DIR})
set_tests_properties(fixture.reference_tensors PROPERTIES FIXTURES_SETUP reference_tensors)

# A throwaway PostgreSQL server (tests/support/postgres.h) for the journal conformance suite and
# the replica tests and benchmarks; product build only.
if(NOT FPXINT_FUZZ)
  find_package(PostgreSQL REQUIRED)
  add_library(fpxint_test_postgres STATIC ${FPXINT_TESTS_DIR}/support/postgres.cc)
  target_include_directories(fpxint_test_postgres PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(fpxint_test_postgres PUBLIC PostgreSQL::PostgreSQL)
endif()
