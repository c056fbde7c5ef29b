# Used by examples/CMakeLists.txt. Fails if BINARY holds an out-of-line function of a
# vector backend (simd::avx2 or simd::avx512 Pack / Acc, or a kernel instantiated for
# them): with runtime dispatch every such call must be inlined into its Isa::run.
find_program(NM nm REQUIRED)
execute_process(COMMAND ${NM} -C ${BINARY} OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nm failed on ${BINARY}")
endif()
string(REGEX MATCHALL "[^\n]*simd::avx(2|512)::(Pack|Acc|Narrow|lo256|hi256)[^\n]*" bad "${syms}")
string(REGEX MATCHALL "[^\n]*kernels::[A-Za-z_0-9]+<[^\n]*simd::avx(2|512)::[^\n]*" bad2 "${syms}")
list(APPEND bad ${bad2})
list(LENGTH bad n)
if(n GREATER 0)
  list(JOIN bad "\n" text)
  message(FATAL_ERROR "${n} backend functions left out of line:\n${text}")
endif()
message(STATUS "no backend function out of line in ${BINARY}")
