# Stand-in for slicer_add_python_unittest (Slicer/Slicer 583e9b3, CMake/SlicerMacroPythonTesting.cmake): registers
# the test py_<TESTNAME_PREFIX><script name without extension>. The real test runs the script's unittest in the
# Slicer application; here the command only checks that the script exists.
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  if(NOT DEFINED MY_SCRIPT)
    message(FATAL_ERROR "SCRIPT is mandatory")
  endif()
  set(_script ${MY_SCRIPT})
  if(NOT IS_ABSOLUTE ${_script})
    set(_script ${CMAKE_CURRENT_SOURCE_DIR}/${_script})
  endif()
  if(NOT EXISTS ${_script})
    message(FATAL_ERROR "slicer_add_python_unittest: no script ${_script}")
  endif()
  get_filename_component(_test_name ${MY_SCRIPT} NAME_WE)
  add_test(NAME py_${MY_TESTNAME_PREFIX}${_test_name} COMMAND ${CMAKE_COMMAND} -E cat ${_script})
endmacro()
