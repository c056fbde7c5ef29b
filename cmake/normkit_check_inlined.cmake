# Used by examples/CMakeLists.txt and tests/CMakeLists.txt. Fails if BINARY holds an
# out-of-line function of a vector backend (simd::avx2 or simd::avx512 Pack / Acc /
# Narrow, or a kernel instantiated for them): with runtime dispatch every such call must
# be inlined into its Isa::run. nm's output is filtered by grep (a CMake regex over the
# whole symbol table of the test binary took minutes).
find_program(NM nm REQUIRED)
find_program(GREP grep REQUIRED)
set(pattern "simd::avx(2|512|512bf16)::(Pack|Acc|Narrow|lo256|hi256)|kernels::[A-Za-z_0-9]+<.*simd::avx(2|512|512bf16)::")
execute_process(COMMAND ${NM} -C ${BINARY}
                COMMAND ${GREP} -E "${pattern}"
                RESULTS_VARIABLE rcs OUTPUT_VARIABLE bad)
list(GET rcs 0 nm_rc)
list(GET rcs 1 grep_rc)
if(NOT nm_rc EQUAL 0)
  message(FATAL_ERROR "nm failed on ${BINARY}")
endif()
if(grep_rc EQUAL 0)
  string(REGEX MATCHALL "\n" lines "${bad}")
  list(LENGTH lines n)
  message(FATAL_ERROR "${n} backend functions left out of line:\n${bad}")
elseif(NOT grep_rc EQUAL 1)
  message(FATAL_ERROR "grep failed (${grep_rc}) on the symbols of ${BINARY}")
endif()
message(STATUS "no backend function out of line in ${BINARY}")
